
/*
 * Copyright (C) ratepool authors
 */


#ifndef _NGX_HTTP_RATEPOOL_TLS_H_INCLUDED_
#define _NGX_HTTP_RATEPOOL_TLS_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>


#if (NGX_HTTP_SSL)

ngx_int_t ngx_http_ratepool_tls_connect(ngx_connection_t *c, ngx_ssl_t *ssl,
    ngx_str_t *name, ngx_uint_t sni, ngx_connection_handler_pt handler);
const char *ngx_http_ratepool_tls_verify(ngx_connection_t *c,
    ngx_str_t *name, ngx_uint_t sni);

#endif


#endif /* _NGX_HTTP_RATEPOOL_TLS_H_INCLUDED_ */

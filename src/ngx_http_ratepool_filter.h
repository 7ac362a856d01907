
/*
 * Copyright (C) ratepool authors
 */


#ifndef _NGX_HTTP_RATEPOOL_FILTER_H_INCLUDED_
#define _NGX_HTTP_RATEPOOL_FILTER_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool.h"


ngx_int_t ngx_http_ratepool_filter_init(ngx_conf_t *cf);
ngx_int_t ngx_http_ratepool_log_handler(ngx_http_request_t *r);
ngx_chain_t *ngx_http_ratepool_out_buf(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx, size_t size);


#endif /* _NGX_HTTP_RATEPOOL_FILTER_H_INCLUDED_ */


/*
 * Copyright (C) ratepool authors
 */


#ifndef _NGX_HTTP_RATEPOOL_BODY_H_INCLUDED_
#define _NGX_HTTP_RATEPOOL_BODY_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool.h"


/* the request body: what admission needs of it, read once it is in */
ngx_int_t ngx_http_ratepool_read_body(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx);

/* asks an OpenAI stream for its usage chunk, for a client that did not */
ngx_int_t ngx_http_ratepool_add_usage(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx);


/* a request header's value, the first of that name with one */
ngx_str_t *ngx_http_ratepool_header_in(ngx_http_request_t *r,
    ngx_str_t *name);


#endif /* _NGX_HTTP_RATEPOOL_BODY_H_INCLUDED_ */

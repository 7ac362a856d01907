
/*
 * Copyright (C) ratepool authors
 */


#ifndef _NGX_HTTP_RATEPOOL_CLOUD_H_INCLUDED_
#define _NGX_HTTP_RATEPOOL_CLOUD_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool.h"


ngx_int_t ngx_http_ratepool_build_request(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx);
ngx_int_t ngx_http_ratepool_cloud_message(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx);
ngx_int_t ngx_http_ratepool_cloud_stream(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx);
ngx_int_t ngx_http_ratepool_cloud_sse(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx, ngx_chain_t *in, ngx_chain_t **out);


#endif /* _NGX_HTTP_RATEPOOL_CLOUD_H_INCLUDED_ */

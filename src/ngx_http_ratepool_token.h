
/*
 * Copyright (C) ratepool authors
 */


#ifndef _NGX_HTTP_RATEPOOL_TOKEN_H_INCLUDED_
#define _NGX_HTTP_RATEPOOL_TOKEN_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool.h"


ngx_int_t ngx_http_ratepool_tokens_init(ngx_cycle_t *cycle,
    ngx_http_ratepool_main_conf_t *rmcf);
ngx_int_t ngx_http_ratepool_token_valid(ngx_http_ratepool_key_t *key,
    time_t now);
ngx_int_t ngx_http_ratepool_token_header(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx);


#endif /* _NGX_HTTP_RATEPOOL_TOKEN_H_INCLUDED_ */

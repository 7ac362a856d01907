
/*
 * Copyright (C) ratepool authors
 */


#ifndef _NGX_HTTP_RATEPOOL_WAIT_H_INCLUDED_
#define _NGX_HTTP_RATEPOOL_WAIT_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool.h"


ngx_int_t ngx_http_ratepool_init_waiting(ngx_conf_t *cf,
    ngx_http_ratepool_pool_t *pool, ngx_uint_t nworkspaces,
    const ngx_http_ratepool_wait_hooks_t *hooks);

/* NGX_OK: queued; NGX_DECLINED: the pool's queue is full */
ngx_int_t ngx_http_ratepool_wait(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx, uint64_t wait_ms);
void ngx_http_ratepool_unwait(ngx_http_ratepool_ctx_t *ctx);

/* something was given back: what waits may fit now */
void ngx_http_ratepool_wake(ngx_http_ratepool_pool_t *pool);


#endif /* _NGX_HTTP_RATEPOOL_WAIT_H_INCLUDED_ */

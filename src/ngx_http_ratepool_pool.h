
/*
 * Copyright (C) ratepool authors
 */


#ifndef _NGX_HTTP_RATEPOOL_POOL_H_INCLUDED_
#define _NGX_HTTP_RATEPOOL_POOL_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool.h"


/* choosing keys, and learning from their answers */

ngx_int_t ngx_http_ratepool_resolve_classes(ngx_http_ratepool_ctx_t *ctx);
ngx_http_ratepool_key_t *ngx_http_ratepool_acquire(
    ngx_http_ratepool_ctx_t *ctx, uint64_t *soonest_ms);
uint64_t ngx_http_ratepool_soonest(ngx_http_ratepool_ctx_t *ctx);
void ngx_http_ratepool_claim(ngx_http_ratepool_ctx_t *ctx, uint64_t until_ms,
    ngx_uint_t take_over);
void ngx_http_ratepool_unclaim(ngx_http_ratepool_ctx_t *ctx);

/* a request's mark on what it holds (0: it holds nothing) */
#define ngx_http_ratepool_claim_id(ctx)  ((ctx)->claim_id)
void ngx_http_ratepool_release(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_ratepool_key_t **key, ngx_uint_t failed);
void ngx_http_ratepool_learn(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_upstream_headers_in_t *h);
void ngx_http_ratepool_charge(ngx_http_ratepool_ctx_t *ctx,
    ratepool_usage_t *usage, int answer, int sse);
ngx_http_ratepool_price_t *ngx_http_ratepool_price_of(
    ngx_http_ratepool_ctx_t *ctx);
void ngx_http_ratepool_count_usage(ngx_http_ratepool_ctx_t *ctx,
    ratepool_usage_t *usage);
ngx_uint_t ngx_http_ratepool_pool_spent(ngx_http_ratepool_pool_t *pool,
    time_t *until);

/* the i-th rate-limit header the gateway reads, NULL past the last */
ngx_str_t *ngx_http_ratepool_learned_header(ngx_uint_t i);


#endif /* _NGX_HTTP_RATEPOOL_POOL_H_INCLUDED_ */


/*
 * Copyright (C) ratepool authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool.h"
#include "ngx_http_ratepool_store.h"


/*
 * The store of one gateway alone: the zone's buckets and conversations'
 * homes, which admission and the key chooser keep themselves, are all
 * there is to share, so a take is always granted, a home always known,
 * and the rest has nothing to tell.
 */


static ngx_int_t ngx_http_ratepool_local_take(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_ratepool_taken_pt handler, void *data);
static void ngx_http_ratepool_local_request(ngx_http_ratepool_ctx_t *ctx);
static void ngx_http_ratepool_local_usage(ngx_http_ratepool_ctx_t *ctx,
    uint64_t input, uint64_t output, uint64_t total, uint64_t cost);
static void ngx_http_ratepool_local_cool(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_ratepool_org_t *org, uint64_t cooldown_ms);
static void ngx_http_ratepool_local_learn(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_ratepool_org_t *org, uint64_t *seen, uint64_t *limits,
    int64_t *remaining);
static void ngx_http_ratepool_local_homed(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_ratepool_org_t *org, uint64_t ttl_ms, ratepool_turn_t *turn);
static ngx_int_t ngx_http_ratepool_local_init_process(ngx_cycle_t *cycle,
    ngx_http_ratepool_main_conf_t *rmcf);
static void ngx_http_ratepool_local_exit_process(
    ngx_http_ratepool_main_conf_t *rmcf);


const ngx_http_ratepool_store_t  ngx_http_ratepool_store_local = {
    ngx_http_ratepool_local_take,
    ngx_http_ratepool_local_request,        /* move */
    ngx_http_ratepool_local_usage,
    ngx_http_ratepool_local_request,        /* end */
    ngx_http_ratepool_local_request,        /* requeue */
    ngx_http_ratepool_local_cool,
    ngx_http_ratepool_local_learn,
    ngx_http_ratepool_local_take,           /* home: the zone has it */
    ngx_http_ratepool_local_homed,
    ngx_http_ratepool_local_init_process,
    ngx_http_ratepool_local_exit_process
};


static ngx_int_t
ngx_http_ratepool_local_take(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_ratepool_taken_pt handler, void *data)
{
    return NGX_OK;
}


static void
ngx_http_ratepool_local_request(ngx_http_ratepool_ctx_t *ctx)
{
}


static void
ngx_http_ratepool_local_usage(ngx_http_ratepool_ctx_t *ctx, uint64_t input,
    uint64_t output, uint64_t total, uint64_t cost)
{
}


static void
ngx_http_ratepool_local_cool(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_ratepool_org_t *org, uint64_t cooldown_ms)
{
}


static void
ngx_http_ratepool_local_learn(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_ratepool_org_t *org, uint64_t *seen, uint64_t *limits,
    int64_t *remaining)
{
}


static void
ngx_http_ratepool_local_homed(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_ratepool_org_t *org, uint64_t ttl_ms, ratepool_turn_t *turn)
{
}


static ngx_int_t
ngx_http_ratepool_local_init_process(ngx_cycle_t *cycle,
    ngx_http_ratepool_main_conf_t *rmcf)
{
    return NGX_OK;
}


static void
ngx_http_ratepool_local_exit_process(ngx_http_ratepool_main_conf_t *rmcf)
{
}

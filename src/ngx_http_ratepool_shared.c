
/*
 * Copyright (C) ratepool authors
 */


#include <hiredis/hiredis.h>

#include "ngx_http_ratepool_module.h"


/*
 * Decisions shared by gateways through Redis (ratepool_zone ... redis=).
 *
 * A request is first admitted by this gateway's own buckets in the zone,
 * which count what this gateway sent; then one script call takes its
 * cost from the workspace and the chosen org in Redis, all or nothing,
 * where every gateway's requests are counted.  What Redis says is
 * mirrored into the zone: an org or workspace Redis found full is marked
 * busy, cooldowns and learned limits are copied, so that the next
 * request that cannot go is answered here without asking.
 *
 * Redis is charged the estimate at the take and the difference once the
 * usage is known; a request that ends without usage gives its tokens
 * back.  Cooldowns and learned limits are sent as they are seen, and
 * nobody waits for those.
 *
 * Keys are "ratepool:{zone}:w:<workspace>", "ratepool:{zone}:o:<org>" and
 * "ratepool:{zone}:gateways": names from nginx.conf, never a secret, all
 * with one hash tag, so that one script may touch them on Redis Cluster.
 */

typedef struct {
    ratepool_resp_arg_t     args[RATEPOOL_RESP_ARGS_MAX];
    ngx_uint_t              n;
    u_char                  buf[512];
    u_char                 *p;
} ngx_http_ratepool_call_t;


static void ngx_http_ratepool_shared_taken(ngx_http_ratepool_redis_cmd_t *cmd,
    void *reply);
static void ngx_http_ratepool_shared_timeout(ngx_event_t *ev);
static void ngx_http_ratepool_shared_mirror(ngx_http_ratepool_ctx_t *ctx,
    redisReply *reply);
static void ngx_http_ratepool_shared_beaten(ngx_http_ratepool_redis_cmd_t *cmd,
    void *reply);


static void
ngx_http_ratepool_call_str(ngx_http_ratepool_call_t *call, u_char *data,
    size_t len)
{
    call->args[call->n].data = data;
    call->args[call->n].len = len;
    call->n++;
}


static void
ngx_http_ratepool_call_int(ngx_http_ratepool_call_t *call, int64_t n)
{
    u_char  *p;

    p = call->p;
    call->p = ngx_sprintf(p, "%L", n);
    ngx_http_ratepool_call_str(call, p, call->p - p);
}


/* "ratepool:{zone}:<kind>:<name>", in the call's buffer */

static void
ngx_http_ratepool_call_key(ngx_http_ratepool_call_t *call,
    ngx_http_ratepool_redis_conf_t *conf, char kind, ngx_str_t *name)
{
    u_char  *p;

    p = call->p;
    call->p = ngx_cpymem(call->p, conf->prefix.data, conf->prefix.len);

    if (kind) {
        *call->p++ = (u_char) kind;
        *call->p++ = ':';
    }

    call->p = ngx_cpymem(call->p, name->data, name->len);
    ngx_http_ratepool_call_str(call, p, call->p - p);
}


/*
 * The arguments every take, undo and adjust has: the workspace's limits
 * and budgets, the periods, the org's limits, then the costs.
 */

static void
ngx_http_ratepool_call_start(ngx_http_ratepool_call_t *call,
    ngx_http_ratepool_redis_conf_t *conf, ngx_http_ratepool_workspace_t *ws,
    ngx_http_ratepool_org_t *org, const char *op)
{
    time_t     now;
    uint64_t   limits[3];
    ngx_uint_t i;
    ratepool_bucket_t  *bucket[3];

    call->n = 0;
    call->p = call->buf;

    ngx_http_ratepool_call_int(call, ws ? 2 : 1);

    if (ws) {
        ngx_http_ratepool_call_key(call, conf, 'w', &ws->name);
    }

    ngx_http_ratepool_call_key(call, conf, 'o', &org->entry);
    ngx_http_ratepool_call_str(call, (u_char *) op, 1);

    ngx_http_ratepool_call_int(call, ws ? (int64_t) ws->rpm : 0);
    ngx_http_ratepool_call_int(call, ws ? (int64_t) ws->itpm : 0);
    ngx_http_ratepool_call_int(call, ws ? (int64_t) ws->otpm : 0);
    ngx_http_ratepool_call_int(call, ws ? (int64_t) ws->daily_tokens : 0);
    ngx_http_ratepool_call_int(call, ws ? (int64_t) ws->monthly_tokens : 0);

    now = ngx_time();
    ngx_http_ratepool_call_int(call,
                          ratepool_budget_period(RATEPOOL_BUDGET_DAY, now));
    ngx_http_ratepool_call_int(call,
                          ratepool_budget_period(RATEPOOL_BUDGET_MONTH, now));

    ngx_http_ratepool_org_buckets(org, bucket, limits);

    for (i = 0; i < 3; i++) {
        ngx_http_ratepool_call_int(call, (int64_t) limits[i]);
    }
}


/*
 * Takes the admitted request's cost in Redis.  NGX_AGAIN: asked, the
 * answer goes to ngx_http_ratepool_shared_done().  NGX_DECLINED: Redis
 * cannot be asked now, the request is decided without it.
 */

ngx_int_t
ngx_http_ratepool_shared_take(ngx_http_ratepool_ctx_t *ctx)
{
    ngx_http_request_t             *r;
    ngx_http_ratepool_org_t        *org;
    ngx_http_ratepool_redis_t      *redis;
    ngx_http_ratepool_call_t        call;
    ngx_http_ratepool_main_conf_t  *rmcf;

    rmcf = ctx->pool->zone->conf;
    redis = ngx_http_ratepool_redis_get(rmcf);
    r = ctx->request;

    if (!ngx_http_ratepool_redis_usable(redis)
        || ctx->shared_asks >= RATEPOOL_SHARED_ASKS_MAX)
    {
        return NGX_DECLINED;
    }

    org = ngx_http_ratepool_ctx_org(ctx, ctx->key);

    ngx_http_ratepool_call_start(&call, rmcf->redis, ctx->workspace, org,
                                 "t");
    ngx_http_ratepool_call_int(&call, 1);
    ngx_http_ratepool_call_int(&call, (int64_t) ctx->input_cost);
    ngx_http_ratepool_call_int(&call, (int64_t) ctx->output_cost);
    ngx_http_ratepool_call_int(&call, 0);

    ctx->cmd = ngx_http_ratepool_redis_script(redis, call.args, call.n, 3,
                                              ngx_http_ratepool_shared_taken,
                                              ctx);
    if (ctx->cmd == NULL) {
        return NGX_DECLINED;
    }

    ctx->shared_asks++;
    ctx->shared_late = 0;
    ctx->shared_org = org;
    ctx->shared_input = ctx->input_cost;
    ctx->shared_output = ctx->output_cost;

    ctx->shared_timer.handler = ngx_http_ratepool_shared_timeout;
    ctx->shared_timer.data = ctx;
    ctx->shared_timer.log = r->connection->log;
    ngx_add_timer(&ctx->shared_timer, rmcf->redis->timeout);

    return NGX_AGAIN;
}


static ngx_int_t
ngx_http_ratepool_take_reply(redisReply *reply)
{
    ngx_uint_t  i;

    if (reply == NULL || reply->type != REDIS_REPLY_ARRAY
        || reply->elements != RATEPOOL_SCRIPT_REPLY_LEN)
    {
        return NGX_ERROR;
    }

    for (i = 0; i < reply->elements; i++) {
        if (reply->element[i]->type != REDIS_REPLY_INTEGER
            || reply->element[i]->integer < 0)
        {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}

#define ngx_http_ratepool_reply_int(reply, n)                                 \
    ((uint64_t) (reply)->element[n]->integer)


static void
ngx_http_ratepool_shared_taken(ngx_http_ratepool_redis_cmd_t *cmd,
    void *data)
{
    redisReply                     *reply = data;
    ngx_int_t                       valid;
    ngx_http_ratepool_ctx_t        *ctx;
    ngx_http_ratepool_redis_t      *redis;
    ngx_http_ratepool_main_conf_t  *rmcf;

    ctx = cmd->data;
    valid = ngx_http_ratepool_take_reply(reply);

    if (ctx == NULL) {
        /* its request is gone: what was taken for it is given back */

        if (valid == NGX_OK && ngx_http_ratepool_reply_int(reply, 0)) {
            rmcf = ngx_http_cycle_get_module_main_conf(ngx_cycle,
                                                     ngx_http_ratepool_module);
            redis = ngx_http_ratepool_redis_get(rmcf);
            ngx_http_ratepool_redis_resend(redis, cmd, 'u');
        }

        return;
    }

    ctx->cmd = NULL;

    if (ctx->shared_timer.timer_set) {
        ngx_del_timer(&ctx->shared_timer);
    }

    if (valid != NGX_OK) {
        if (!ctx->shared_late) {
            ngx_http_ratepool_shared_done(ctx, NGX_ERROR, 0, 0);
        }

        return;
    }

    ngx_http_ratepool_shared_mirror(ctx, reply);

    if (ngx_http_ratepool_reply_int(reply, RATEPOOL_SCRIPT_OK)) {
        ctx->shared = 1;

        if (!ctx->shared_late) {
            ngx_http_ratepool_shared_done(ctx, NGX_OK, 0, 0);
        }

        return;
    }

    if (!ctx->shared_late) {
        ngx_http_ratepool_shared_done(ctx, NGX_AGAIN,
                       ngx_http_ratepool_reply_int(reply,
                                                   RATEPOOL_SCRIPT_WAIT_MS),
                       ngx_http_ratepool_reply_int(reply,
                                                   RATEPOOL_SCRIPT_MASK));
    }
}


/* the request's time for Redis is over: it goes on without the answer */

static void
ngx_http_ratepool_shared_timeout(ngx_event_t *ev)
{
    ngx_http_ratepool_ctx_t *ctx = ev->data;

    ngx_http_ratepool_redis_t      *redis;
    ngx_http_ratepool_main_conf_t  *rmcf;

    rmcf = ctx->pool->zone->conf;
    redis = ngx_http_ratepool_redis_get(rmcf);

    ctx->shared_late = 1;

    ngx_log_error(NGX_LOG_INFO, ev->log, 0,
                  "ratepool: redis did not answer in %M ms",
                  rmcf->redis->timeout);

    ngx_http_ratepool_redis_timed_out(redis);

    ngx_http_ratepool_shared_done(ctx, NGX_ERROR, 0, 0);
}


/*
 * What Redis knows goes into the zone, where this gateway's next
 * requests find it without asking: every gateway's cooldown of the org,
 * its learned limits, the workspace's budgets, and, when the take was
 * refused, until when the workspace or the org is full.
 */

static void
ngx_http_ratepool_shared_mirror(ngx_http_ratepool_ctx_t *ctx,
    redisReply *reply)
{
    time_t                             now;
    uint64_t                           now_ms, ms, mask, used, n;
    ngx_uint_t                         i;
    ngx_slab_pool_t                   *shpool;
    ngx_http_ratepool_org_sh_t        *osh;
    ngx_http_ratepool_learned_t       *learned;
    ngx_http_ratepool_workspace_sh_t  *wsh;

    osh = ctx->shared_org->sh;
    wsh = ctx->workspace->sh;
    shpool = ctx->pool->zone->shpool;
    now = ngx_time();
    now_ms = ngx_http_ratepool_now_ms();

    ms = ngx_http_ratepool_reply_int(reply, RATEPOOL_SCRIPT_WAIT_MS);
    mask = ngx_http_ratepool_reply_int(reply, RATEPOOL_SCRIPT_MASK);

    ngx_shmtx_lock(&shpool->mutex);

    n = ngx_http_ratepool_reply_int(reply, RATEPOOL_SCRIPT_COOLDOWN_MS);

    if (n) {
        osh->cooldown_until_ms = ngx_max(osh->cooldown_until_ms,
                                         now_ms + ngx_min(n,
                                                  RATEPOOL_COOLDOWN_MAX_MS));
    }

    for (i = 0; i < 3; i++) {
        learned = &osh->requests + i;
        n = ngx_http_ratepool_reply_int(reply, RATEPOOL_SCRIPT_LEARNED + i);

        if (n && learned->limit == 0) {
            learned->limit = n;
        }
    }

    used = ngx_http_ratepool_reply_int(reply, RATEPOOL_SCRIPT_DAY_USED);

    if (used > ratepool_budget_used(&wsh->today, RATEPOOL_BUDGET_DAY, now)) {
        wsh->today.used = used;
        wsh->today.period = ratepool_budget_period(RATEPOOL_BUDGET_DAY, now);
    }

    used = ngx_http_ratepool_reply_int(reply, RATEPOOL_SCRIPT_MONTH_USED);

    if (used > ratepool_budget_used(&wsh->this_month, RATEPOOL_BUDGET_MONTH,
                                    now))
    {
        wsh->this_month.used = used;
        wsh->this_month.period = ratepool_budget_period(RATEPOOL_BUDGET_MONTH,
                                                        now);
    }

    if (mask & RATEPOOL_DENY_WORKSPACE) {
        wsh->busy_until_ms = ngx_max(wsh->busy_until_ms, now_ms + ms);
    }

    if (mask & RATEPOOL_DENY_ORG) {
        osh->busy_until_ms = ngx_max(osh->busy_until_ms, now_ms + ms);
    }

    ngx_shmtx_unlock(&shpool->mutex);
}


/* a later try goes to another org: the charge moves with it */

void
ngx_http_ratepool_shared_move(ngx_http_ratepool_ctx_t *ctx)
{
    ngx_http_ratepool_org_t        *org;
    ngx_http_ratepool_redis_t      *redis;
    ngx_http_ratepool_call_t        call;
    ngx_http_ratepool_main_conf_t  *rmcf;

    if (!ctx->shared) {
        return;
    }

    org = ngx_http_ratepool_ctx_org(ctx, ctx->key);

    if (org == ctx->shared_org) {
        return;
    }

    rmcf = ctx->pool->zone->conf;
    redis = ngx_http_ratepool_redis_get(rmcf);

    /* the org that refused counted the request, not its tokens */
    ngx_http_ratepool_call_start(&call, rmcf->redis, NULL, ctx->shared_org,
                                 "a");
    ngx_http_ratepool_call_int(&call, 0);
    ngx_http_ratepool_call_int(&call, -(int64_t) ctx->shared_input);
    ngx_http_ratepool_call_int(&call, -(int64_t) ctx->shared_output);
    ngx_http_ratepool_call_int(&call, 0);

    (void) ngx_http_ratepool_redis_script(redis, call.args, call.n, 2, NULL,
                                          NULL);

    ngx_http_ratepool_call_start(&call, rmcf->redis, NULL, org, "a");
    ngx_http_ratepool_call_int(&call, 1);
    ngx_http_ratepool_call_int(&call, (int64_t) ctx->shared_input);
    ngx_http_ratepool_call_int(&call, (int64_t) ctx->shared_output);
    ngx_http_ratepool_call_int(&call, 0);

    (void) ngx_http_ratepool_redis_script(redis, call.args, call.n, 2, NULL,
                                          NULL);

    ctx->shared_org = org;
}


/* what the request really used replaces what was taken for it */

void
ngx_http_ratepool_shared_usage(ngx_http_ratepool_ctx_t *ctx, uint64_t input,
    uint64_t output, uint64_t total)
{
    ngx_http_ratepool_redis_t      *redis;
    ngx_http_ratepool_call_t        call;
    ngx_http_ratepool_main_conf_t  *rmcf;

    if (ctx->cmd) {
        /* the take is still unanswered: it will be undone */
        ctx->cmd->data = NULL;
        ctx->cmd = NULL;
    }

    if (!ctx->shared) {
        return;
    }

    ctx->shared = 0;

    rmcf = ctx->pool->zone->conf;
    redis = ngx_http_ratepool_redis_get(rmcf);

    ngx_http_ratepool_call_start(&call, rmcf->redis, ctx->workspace,
                                 ctx->shared_org, "a");
    ngx_http_ratepool_call_int(&call, 0);
    ngx_http_ratepool_call_int(&call,
                               (int64_t) input - (int64_t) ctx->shared_input);
    ngx_http_ratepool_call_int(&call, (int64_t) output
                                      - (int64_t) ctx->shared_output);
    ngx_http_ratepool_call_int(&call, (int64_t) total);

    (void) ngx_http_ratepool_redis_script(redis, call.args, call.n, 3, NULL,
                                          NULL);
}


/* the request ends: tokens taken and never used go back */

void
ngx_http_ratepool_shared_end(ngx_http_ratepool_ctx_t *ctx)
{
    if (ctx->shared_timer.timer_set) {
        ngx_del_timer(&ctx->shared_timer);
    }

    if (ctx->cmd == NULL && !ctx->shared) {
        return;
    }

    ngx_http_ratepool_shared_usage(ctx, 0, 0, 0);
}


/* a 429 cools the org on every gateway; cooldowns only grow */

void
ngx_http_ratepool_shared_cool(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_ratepool_org_t *org, uint64_t cooldown_ms)
{
    uint64_t                        limits[3];
    ratepool_bucket_t              *bucket[3];
    ngx_http_ratepool_redis_t      *redis;
    ngx_http_ratepool_call_t        call;
    ngx_http_ratepool_main_conf_t  *rmcf;

    rmcf = ctx->pool->zone->conf;
    redis = ngx_http_ratepool_redis_get(rmcf);

    if (redis == NULL) {
        return;
    }

    ngx_http_ratepool_org_buckets(org, bucket, limits);

    call.n = 0;
    call.p = call.buf;

    ngx_http_ratepool_call_int(&call, 1);
    ngx_http_ratepool_call_key(&call, rmcf->redis, 'o', &org->entry);
    ngx_http_ratepool_call_str(&call, (u_char *) "c", 1);
    ngx_http_ratepool_call_int(&call, (int64_t) cooldown_ms);
    ngx_http_ratepool_call_int(&call, (int64_t) limits[0]);

    (void) ngx_http_ratepool_redis_script(redis, call.args, call.n, 2, NULL,
                                          NULL);
}


/* limits and what is left of them, as an answer's headers said */

void
ngx_http_ratepool_shared_learn(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_ratepool_org_t *org, uint64_t *seen, uint64_t *limits,
    int64_t *remaining)
{
    ngx_uint_t                      i;
    ngx_http_ratepool_redis_t      *redis;
    ngx_http_ratepool_call_t        call;
    ngx_http_ratepool_main_conf_t  *rmcf;

    rmcf = ctx->pool->zone->conf;
    redis = ngx_http_ratepool_redis_get(rmcf);

    if (redis == NULL) {
        return;
    }

    call.n = 0;
    call.p = call.buf;

    ngx_http_ratepool_call_int(&call, 1);
    ngx_http_ratepool_call_key(&call, rmcf->redis, 'o', &org->entry);
    ngx_http_ratepool_call_str(&call, (u_char *) "l", 1);

    for (i = 0; i < 3; i++) {
        ngx_http_ratepool_call_int(&call, (int64_t) seen[i]);
    }

    for (i = 0; i < 3; i++) {
        ngx_http_ratepool_call_int(&call, (int64_t) limits[i]);
    }

    for (i = 0; i < 3; i++) {
        ngx_http_ratepool_call_int(&call, remaining[i]);
    }

    (void) ngx_http_ratepool_redis_script(redis, call.args, call.n, 2, NULL,
                                          NULL);
}


/*
 * Every few seconds each worker says its gateway is alive; the number of
 * live gateways is what a gateway divides limits by while Redis is down.
 */

void
ngx_http_ratepool_shared_beat(ngx_http_ratepool_redis_t *redis,
    ngx_http_ratepool_main_conf_t *rmcf)
{
    ngx_str_t                    name, id;
    ngx_http_ratepool_call_t     call;
    ngx_http_ratepool_zone_t    *zone;

    zone = rmcf->shm_zone->data;

    ngx_str_set(&name, "gateways");
    id.data = zone->sh->gateway;
    id.len = sizeof(zone->sh->gateway);

    call.n = 0;
    call.p = call.buf;

    ngx_http_ratepool_call_int(&call, 1);
    ngx_http_ratepool_call_key(&call, rmcf->redis, 0, &name);
    ngx_http_ratepool_call_str(&call, (u_char *) "b", 1);
    ngx_http_ratepool_call_str(&call, id.data, id.len);

    if (ngx_http_ratepool_redis_script(redis, call.args, call.n, 2,
                                       ngx_http_ratepool_shared_beaten,
                                       redis)
        == NULL)
    {
        ngx_http_ratepool_redis_beat_later(redis);
    }
}


static void
ngx_http_ratepool_shared_beaten(ngx_http_ratepool_redis_cmd_t *cmd,
    void *data)
{
    redisReply                     *reply = data;
    ngx_http_ratepool_zone_t       *zone;
    ngx_http_ratepool_redis_t      *redis;
    ngx_http_ratepool_main_conf_t  *rmcf;

    redis = cmd->data;

    rmcf = ngx_http_cycle_get_module_main_conf(ngx_cycle,
                                               ngx_http_ratepool_module);
    zone = rmcf->shm_zone->data;

    if (reply && reply->type == REDIS_REPLY_INTEGER && reply->integer > 0) {
        zone->sh->gateways = (ngx_atomic_uint_t) reply->integer;
    }

    ngx_http_ratepool_redis_beat_later(redis);
}

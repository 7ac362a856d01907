
/*
 * Copyright (C) ratepool authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <hiredis/hiredis.h>

#include "ngx_http_ratepool.h"
#include "ngx_http_ratepool_home.h"
#include "ngx_http_ratepool_redis.h"
#include "ngx_http_ratepool_org.h"
#include "ngx_http_ratepool_store.h"


/*
 * Decisions shared by gateways through Redis (ratepool_zone ... redis=).
 *
 * A request is first admitted by this gateway's own buckets in the zone,
 * which count what this gateway sent.  Then Redis, where every gateway's
 * requests are counted, takes its cost from the workspace and the chosen
 * org, all or nothing, in one script call; what it answers is copied into
 * the zone: an org or workspace found full is marked busy, cooldowns,
 * learned limits, budgets and what is left in each bucket are copied, so
 * that the next request that cannot go is answered here without asking.
 *
 * The fast path: while Redis's last word (at most a second old) leaves a
 * bucket nearly full, so full that every live gateway could take its
 * share of what is missing, and more, before Redis is asked again, a
 * request is admitted on the copy, and its cost is sent afterwards.
 * Near a limit every request asks, so limits hold exactly there.
 *
 * Costs admitted on the copy, usage that replaces an estimate, and
 * tokens given back are gathered per workspace and org in each worker
 * (the ledger) and sent as one adjustment every RATEPOOL_SHARED_FLUSH_MS;
 * nobody waits for those, and their answers refresh the copy.
 *
 * Keys are "ratepool:{zone}:w:<workspace>", "ratepool:{zone}:o:<org>" and
 * "ratepool:{zone}:gateways": names from nginx.conf, never a secret, all
 * with one hash tag, so that one script may touch them on Redis Cluster.
 */

#define RATEPOOL_SHARED_FLUSH_MS    20
#define RATEPOOL_SHARED_FRESH_MS    1000
#define RATEPOOL_SHARED_LEASE_MS    1000
#define RATEPOOL_SHARED_ASK_MS      100     /* for a lease, at most */


/*
 * One script call's arguments: a take has the most, 27: the number of
 * keys, two keys of at most 210 bytes ("ratepool:{zone}:o:org/model",
 * names of 64) and 24 integers of at most 20 characters, in the buffer.
 */

#define RATEPOOL_CALL_ARGS          28

typedef struct {
    ratepool_resp_arg_t     args[RATEPOOL_CALL_ARGS];
    ngx_uint_t              n;
    u_char                  buf[1024];
    u_char                 *p;
} ngx_http_ratepool_call_t;


/* charges of one workspace (or none) and org, not yet sent */

typedef struct {
    ngx_queue_t                     queue;      /* while there are some */
    ngx_http_ratepool_workspace_t  *workspace;
    ngx_http_ratepool_org_t        *org;
    int64_t                         delta[RATEPOOL_DIMS];
    uint64_t                        tokens;     /* toward budgets */
    uint64_t                        cost;       /* nano-dollars, too */
    unsigned                        dirty:1;
} ngx_http_ratepool_entry_ledger_t;


typedef struct {
    ngx_http_ratepool_entry_ledger_t  *entries;
    ngx_uint_t                         norgs;
    ngx_queue_t                        dirty;
    ngx_event_t                        flush;
    ngx_event_t                        expire;     /* unused leases */
    ngx_http_ratepool_main_conf_t     *rmcf;
    ngx_http_ratepool_zone_t          *zone;
} ngx_http_ratepool_ledger_t;


static ngx_int_t ngx_http_ratepool_shared_init_process(ngx_cycle_t *cycle,
    ngx_http_ratepool_main_conf_t *rmcf);
static void ngx_http_ratepool_shared_exit_process(
    ngx_http_ratepool_main_conf_t *rmcf);
static ngx_int_t ngx_http_ratepool_shared_take(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_ratepool_taken_pt handler, void *data);
static ngx_int_t ngx_http_ratepool_shared_fallback(
    ngx_http_ratepool_ctx_t *ctx);
static void ngx_http_ratepool_shared_done(ngx_http_ratepool_ctx_t *ctx,
    ngx_int_t rc, uint64_t wait_ms, ngx_uint_t mask);
static void ngx_http_ratepool_shared_move(ngx_http_ratepool_ctx_t *ctx);
static void ngx_http_ratepool_shared_usage(ngx_http_ratepool_ctx_t *ctx,
    uint64_t input, uint64_t output, uint64_t total, uint64_t cost);
static void ngx_http_ratepool_shared_end(ngx_http_ratepool_ctx_t *ctx);
static void ngx_http_ratepool_shared_requeue(ngx_http_ratepool_ctx_t *ctx);
static void ngx_http_ratepool_shared_cool(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_ratepool_org_t *org, uint64_t cooldown_ms);
static void ngx_http_ratepool_shared_learn(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_ratepool_org_t *org, uint64_t *seen, uint64_t *limits,
    int64_t *remaining);
static void ngx_http_ratepool_shared_beat(ngx_http_ratepool_redis_t *redis,
    void *data, ngx_uint_t connected);
static void ngx_http_ratepool_shared_reseed(ngx_http_ratepool_redis_t *redis,
    ngx_http_ratepool_main_conf_t *rmcf);
static void ngx_http_ratepool_reseed_budgets(ngx_http_ratepool_redis_t *redis,
    ngx_http_ratepool_main_conf_t *rmcf);
static ngx_http_ratepool_redis_cmd_t *ngx_http_ratepool_uncool_call(
    ngx_http_ratepool_redis_t *redis, ngx_http_ratepool_main_conf_t *rmcf,
    ngx_http_ratepool_org_t *org);
static void ngx_http_ratepool_uncooled(ngx_http_ratepool_redis_cmd_t *cmd,
    void *data);
static ngx_http_ratepool_redis_cmd_t *ngx_http_ratepool_cool_call(
    ngx_http_ratepool_redis_t *redis, ngx_http_ratepool_main_conf_t *rmcf,
    ngx_http_ratepool_org_t *org, uint64_t cooldown_ms, uint64_t rpm);
static void ngx_http_ratepool_learn_call(ngx_http_ratepool_redis_t *redis,
    ngx_http_ratepool_main_conf_t *rmcf, ngx_http_ratepool_org_t *org,
    uint64_t *seen, uint64_t *limits, int64_t *remaining, ngx_uint_t lost);
static ngx_int_t ngx_http_ratepool_shared_home(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_ratepool_taken_pt handler, void *data);
static void ngx_http_ratepool_home_reply(ngx_http_ratepool_redis_cmd_t *cmd,
    void *reply);
static void ngx_http_ratepool_home_timeout(ngx_event_t *ev);
static void ngx_http_ratepool_shared_homed(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_ratepool_org_t *org, uint64_t ttl_ms, ratepool_turn_t *turn);
static void ngx_http_ratepool_home_key(ngx_http_ratepool_call_t *call,
    ngx_http_ratepool_redis_conf_t *conf, uint64_t id);
static ngx_int_t ngx_http_ratepool_shared_fast(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_ratepool_org_t *org);
static void ngx_http_ratepool_lease_costs(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_ratepool_org_t *org, uint64_t *limits, uint64_t *cost);
static void ngx_http_ratepool_shared_taken(ngx_http_ratepool_redis_cmd_t *cmd,
    void *reply);
static void ngx_http_ratepool_shared_timeout(ngx_event_t *ev);
static void ngx_http_ratepool_shared_settle(ngx_http_ratepool_ctx_t *ctx,
    int64_t requests, uint64_t input, uint64_t output, uint64_t total,
    uint64_t cost);
static void ngx_http_ratepool_lease_grant(ngx_http_ratepool_ctx_t *ctx);
static ngx_uint_t ngx_http_ratepool_shared_expire(
    ngx_http_ratepool_main_conf_t *rmcf);
static void ngx_http_ratepool_lease_timer(ngx_event_t *ev);
static ngx_int_t ngx_http_ratepool_take_reply(redisReply *reply);
static void ngx_http_ratepool_shared_mirror(ngx_http_ratepool_zone_t *zone,
    ngx_http_ratepool_workspace_t *ws, ngx_http_ratepool_org_t *org,
    redisReply *reply);
static void ngx_http_ratepool_ledger_add(ngx_http_ratepool_main_conf_t *rmcf,
    ngx_http_ratepool_workspace_t *ws, ngx_http_ratepool_org_t *org,
    int64_t requests, int64_t input, int64_t output, uint64_t tokens,
    uint64_t cost);
static void ngx_http_ratepool_ledger_flush(ngx_event_t *ev);
static void ngx_http_ratepool_shared_adjusted(
    ngx_http_ratepool_redis_cmd_t *cmd, void *reply);
static void ngx_http_ratepool_shared_beaten(ngx_http_ratepool_redis_cmd_t *cmd,
    void *reply);


const ngx_http_ratepool_store_t  ngx_http_ratepool_store_redis = {
    ngx_http_ratepool_shared_take,
    ngx_http_ratepool_shared_move,
    ngx_http_ratepool_shared_usage,
    ngx_http_ratepool_shared_end,
    ngx_http_ratepool_shared_requeue,
    ngx_http_ratepool_shared_cool,
    ngx_http_ratepool_shared_learn,
    ngx_http_ratepool_shared_home,
    ngx_http_ratepool_shared_homed,
    ngx_http_ratepool_shared_init_process,
    ngx_http_ratepool_shared_exit_process
};


static ngx_int_t
ngx_http_ratepool_shared_init_process(ngx_cycle_t *cycle,
    ngx_http_ratepool_main_conf_t *rmcf)
{
    ngx_uint_t                   i, j, n;
    ngx_http_ratepool_org_t     *orgs;
    ngx_http_ratepool_pool_t   **pools;
    ngx_http_ratepool_ledger_t  *ledger;

    if (ngx_http_ratepool_redis_init_process(cycle, rmcf,
                                             ngx_http_ratepool_shared_beat,
                                             rmcf)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    ledger = ngx_pcalloc(cycle->pool, sizeof(ngx_http_ratepool_ledger_t));
    if (ledger == NULL) {
        return NGX_ERROR;
    }

    /* every org class of every pool gets its entries, in this worker */

    pools = rmcf->pools.elts;
    n = 0;

    for (i = 0; i < rmcf->pools.nelts; i++) {
        orgs = pools[i]->orgs->elts;

        for (j = 0; j < pools[i]->orgs->nelts; j++) {
            orgs[j].ledger = n++;
        }
    }

    /* a column more, for a workspace alone */
    ledger->norgs = n + 1;
    ledger->entries = ngx_pcalloc(cycle->pool,
                                  (n + 1) * (rmcf->workspaces.nelts + 1)
                                  * sizeof(ngx_http_ratepool_entry_ledger_t));
    if (ledger->entries == NULL) {
        return NGX_ERROR;
    }

    ngx_queue_init(&ledger->dirty);

    ledger->rmcf = rmcf;
    ledger->zone = rmcf->shm_zone->data;
    ledger->flush.handler = ngx_http_ratepool_ledger_flush;
    ledger->flush.data = ledger;
    ledger->flush.log = cycle->log;

    ledger->expire.handler = ngx_http_ratepool_lease_timer;
    ledger->expire.data = ledger;
    ledger->expire.log = cycle->log;
    ledger->expire.cancelable = 1;

    rmcf->redis->ledger = ledger;

    return NGX_OK;
}


/* a worker that exits sends what it has, as far as a write goes */

static void
ngx_http_ratepool_shared_exit_process(ngx_http_ratepool_main_conf_t *rmcf)
{
    ngx_http_ratepool_ledger_t  *ledger;

    ledger = rmcf->redis->ledger;

    if (ledger && !ngx_queue_empty(&ledger->dirty)) {
        if (ledger->flush.timer_set) {
            ngx_del_timer(&ledger->flush);
        }

        ngx_http_ratepool_ledger_flush(&ledger->flush);

        if (rmcf->redis->conn) {
            ngx_http_ratepool_redis_send_now(rmcf->redis->conn);
        }
    }
    ngx_http_ratepool_redis_exit_process(rmcf);
}


static void
ngx_http_ratepool_call_str(ngx_http_ratepool_call_t *call, u_char *data,
    size_t len)
{
    if (call->n == RATEPOOL_CALL_ARGS) {
        /* a bug: the script would be called with arguments missing */
        ngx_log_error(NGX_LOG_ALERT, ngx_cycle->log, 0,
                      "ratepool: too many redis arguments");
        return;
    }

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
 * and budgets, the periods, the org's limits and whether one of them
 * counts all tokens, then the costs.
 */

static void
ngx_http_ratepool_call_start(ngx_http_ratepool_call_t *call,
    ngx_http_ratepool_redis_conf_t *conf, ngx_http_ratepool_workspace_t *ws,
    ngx_http_ratepool_org_t *org, const char *op)
{
    time_t              now;
    uint64_t            limits[RATEPOOL_DIMS];
    ngx_uint_t          i;
    ratepool_bucket_t  *bucket[RATEPOOL_DIMS];

    call->n = 0;
    call->p = call->buf;

    ngx_http_ratepool_call_int(call, (ws && org) ? 2 : 1);

    if (ws) {
        ngx_http_ratepool_call_key(call, conf, 'w', &ws->name);
    }

    if (org) {
        ngx_http_ratepool_call_key(call, conf, 'o', &org->entry);
    }

    /* "A": an adjustment of a workspace alone */
    ngx_http_ratepool_call_str(call,
                               (u_char *) (org == NULL ? "A" : op), 1);

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

    ngx_memzero(limits, sizeof(limits));

    if (org) {
        ngx_http_ratepool_org_buckets(org, bucket, limits);
    }

    for (i = 0; i < RATEPOOL_DIMS; i++) {
        ngx_http_ratepool_call_int(call, (int64_t) limits[i]);
    }

    ngx_http_ratepool_call_int(call, (org && org->combined) ? 1 : 0);
}


/*
 * A lease's holders' limits and the request's cost to each: the
 * workspace's, then the org's (its limits are the zone's, read locked).
 */

static void
ngx_http_ratepool_lease_costs(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_ratepool_org_t *org, uint64_t *limits, uint64_t *cost)
{
    ngx_http_ratepool_workspace_t  *ws;

    ws = ctx->workspace;

    limits[RATEPOOL_RPM] = ws->rpm;
    limits[RATEPOOL_ITPM] = ws->itpm;
    limits[RATEPOOL_OTPM] = ws->otpm;

    cost[RATEPOOL_RPM] = 1;
    cost[RATEPOOL_ITPM] = ctx->input_cost;
    cost[RATEPOOL_OTPM] = ctx->output_cost;
    cost[RATEPOOL_DIMS + RATEPOOL_RPM] = 1;
    ngx_http_ratepool_org_split(org,
                                ctx->held_input,
                                ctx->output_cost, &cost[RATEPOOL_DIMS]);
}


/*
 * A lease is capacity taken in Redis along with a request, for the
 * gateway's next requests (ratepool_lease_blocks()).  Redis grants it
 * only while the bucket stays over half full, so near a limit every
 * request asks, and limits hold exactly.
 */

static void
ngx_http_ratepool_blocks(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_ratepool_org_t *org, uint64_t *block)
{
    uint64_t                        now_ms, *lease[2], *asked[2],
                                    limits[RATEPOOL_LEASE_BLOCKS],
                                    cost[RATEPOOL_LEASE_BLOCKS];
    ngx_uint_t                      k, d, ask;
    ngx_slab_pool_t                *shpool;
    ratepool_bucket_t              *bucket[RATEPOOL_DIMS];
    ngx_http_ratepool_workspace_t  *ws;

    ws = ctx->workspace;
    now_ms = ngx_http_ratepool_now_ms();
    shpool = ctx->pool->zone->shpool;

    ngx_http_ratepool_lease_costs(ctx, org, limits, cost);

    ngx_shmtx_lock(&shpool->mutex);

    ngx_http_ratepool_org_buckets(org, bucket, &limits[RATEPOOL_DIMS]);

    ratepool_lease_blocks(limits, cost, ctx->pool->zone->sh->gateways, block);

    /*
     * One lease at a time, and none while one is held: a burst must not
     * gather blocks it cannot use before they expire.
     */

    lease[0] = ws->sh->lim.lease;
    lease[1] = org->sh->lim.lease;
    asked[0] = &ws->sh->lim.lease_asked_ms;
    asked[1] = &org->sh->lim.lease_asked_ms;

    for (k = 0; k < 2; k++) {
        ask = ((*asked[k] == 0
                || now_ms - *asked[k] > RATEPOOL_SHARED_ASK_MS)
               && ratepool_dims_zero(lease[k]));

        if (!ask) {
            for (d = 0; d < RATEPOOL_DIMS; d++) {
                block[RATEPOOL_DIMS * k + d] = 0;
            }

        } else if (!ratepool_dims_zero(&block[RATEPOOL_DIMS * k])) {
            *asked[k] = now_ms;
        }
    }

    ngx_shmtx_unlock(&shpool->mutex);
}


/*
 * With the zone locked: a lease past its time goes back to Redis, once,
 * through the ledger.
 */

static ngx_uint_t
ngx_http_ratepool_lease_expire(ngx_http_ratepool_main_conf_t *rmcf,
    ngx_http_ratepool_workspace_t *ws, ngx_http_ratepool_org_t *org,
    uint64_t *lease, uint64_t until_ms, uint64_t now_ms)
{
    if (ratepool_dims_zero(lease)) {
        return 0;
    }

    if (until_ms > now_ms) {
        /* still held: look again later */
        return 1;
    }

    ngx_http_ratepool_ledger_add(rmcf, ws, org,
                                 -(int64_t) lease[RATEPOOL_RPM],
                                 -(int64_t) lease[RATEPOOL_ITPM],
                                 -(int64_t) lease[RATEPOOL_OTPM], 0, 0);
    ngx_memzero(lease, RATEPOOL_DIMS * sizeof(uint64_t));

    return 0;
}


/*
 * May the request go without asking Redis?  If the gateway's leases of
 * the workspace and the org hold its cost, it is taken from them.  An org
 * of no known limits needs no lease, only word from Redis (its
 * cooldowns) at most a second old; so does a workspace with budgets.
 */

static ngx_int_t
ngx_http_ratepool_shared_fast(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_ratepool_org_t *org)
{
    int                                held[2];
    uint64_t                           now_ms,
                                       limits[RATEPOOL_LEASE_BLOCKS],
                                       cost[RATEPOOL_LEASE_BLOCKS];
    ngx_int_t                          rc;
    ngx_uint_t                         k;
    ratepool_bucket_t                 *bucket[RATEPOOL_DIMS];
    ngx_slab_pool_t                   *shpool;
    ngx_http_ratepool_workspace_t     *ws;
    ngx_http_ratepool_org_sh_t        *osh;
    ngx_http_ratepool_workspace_sh_t  *wsh;
    uint64_t                          *lease[2];

    ws = ctx->workspace;
    wsh = ws->sh;
    osh = org->sh;
    shpool = ctx->pool->zone->shpool;
    now_ms = ngx_http_ratepool_now_ms();

    ngx_http_ratepool_lease_costs(ctx, org, limits, cost);

    lease[0] = wsh->lim.lease;
    lease[1] = osh->lim.lease;

    rc = NGX_OK;

    ngx_shmtx_lock(&shpool->mutex);

    /* a lease is used even late: Redis counted it when it was granted */

    ngx_http_ratepool_org_buckets(org, bucket, &limits[RATEPOOL_DIMS]);

    for (k = 0; k < 2; k++) {
        held[k] = ratepool_lease_holds(&limits[RATEPOOL_DIMS * k], lease[k],
                                       &cost[RATEPOOL_DIMS * k]);

        if (held[k] < 0) {
            rc = NGX_DECLINED;
            goto done;
        }
    }

    if (held[1] == 0
        && (osh->lim.shared_seen_ms == 0
            || now_ms - osh->lim.shared_seen_ms > RATEPOOL_SHARED_FRESH_MS))
    {
        rc = NGX_DECLINED;
        goto done;
    }

    /* budgets are the fleet's: what Redis last said of them must be new */
    if (ngx_http_ratepool_has_budget(ws)
        && (wsh->lim.shared_seen_ms == 0
            || now_ms - wsh->lim.shared_seen_ms > RATEPOOL_SHARED_FRESH_MS))
    {
        rc = NGX_DECLINED;
        goto done;
    }

    for (k = 0; k < 2; k++) {
        ratepool_lease_take(&limits[RATEPOOL_DIMS * k], lease[k],
                            &cost[RATEPOOL_DIMS * k]);
    }

done:

    ngx_shmtx_unlock(&shpool->mutex);

    return rc;
}


/*
 * Where the fleet keeps a conversation's cache: asked before admission,
 * so that every gateway sends a conversation's turns to one org, and
 * copied into the zone, where the chooser looks.  NGX_AGAIN: asked, the
 * answer (or none, in redis_timeout) goes to handler(data, ...); NGX_OK:
 * Redis cannot be asked, the zone's word is all there is.
 */

static ngx_int_t
ngx_http_ratepool_shared_home(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_ratepool_taken_pt handler, void *data)
{
    ngx_http_ratepool_redis_t      *redis;
    ngx_http_ratepool_call_t        call;
    ngx_http_ratepool_main_conf_t  *rmcf;

    rmcf = ctx->pool->zone->conf;
    redis = ngx_http_ratepool_redis_get(rmcf);

    if (!ngx_http_ratepool_redis_usable(redis)) {
        return NGX_OK;
    }

    call.n = 0;
    call.p = call.buf;

    ngx_http_ratepool_call_int(&call, 1);
    ngx_http_ratepool_home_key(&call, rmcf->redis, ctx->conversation);
    ngx_http_ratepool_call_str(&call, (u_char *) "h", 1);

    ctx->shared.home_cmd = ngx_http_ratepool_redis_script(redis, call.args,
                                              call.n, 2,
                                              ngx_http_ratepool_home_reply,
                                              ctx);
    if (ctx->shared.home_cmd == NULL) {
        return NGX_OK;
    }

    ctx->shared.handler = handler;
    ctx->shared.data = data;

    ctx->shared.timer.handler = ngx_http_ratepool_home_timeout;
    ctx->shared.timer.data = ctx;
    ctx->shared.timer.log = ctx->request->connection->log;
    ngx_add_timer(&ctx->shared.timer, rmcf->redis->timeout);

    return NGX_AGAIN;
}


/* "ratepool:{zone}:c:<the conversation's key in hex>": no secret in it */

static void
ngx_http_ratepool_home_key(ngx_http_ratepool_call_t *call,
    ngx_http_ratepool_redis_conf_t *conf, uint64_t id)
{
    u_char     hex[16];
    ngx_str_t  name;

    name.data = hex;
    name.len = ngx_sprintf(hex, "%016xL", id) - hex;

    ngx_http_ratepool_call_key(call, conf, 'c', &name);
}


/*
 * Redis's word on a conversation's home: the org, how long its cache
 * lives, and what its last turn said of its prompt.  An org this pool
 * does not have is no home here.
 */

static void
ngx_http_ratepool_home_reply(ngx_http_ratepool_redis_cmd_t *cmd, void *data)
{
    redisReply                 *reply = data;

    int64_t                     ttl_ms;
    ngx_str_t                   name;
    ngx_uint_t                  i;
    ratepool_turn_t             turn;
    ngx_slab_pool_t            *shpool;
    ngx_http_ratepool_ctx_t    *ctx;
    ngx_http_ratepool_org_t    *orgs;

    ctx = cmd->data;

    if (ctx == NULL) {
        return;
    }

    ctx->shared.home_cmd = NULL;

    if (ctx->shared.timer.timer_set) {
        ngx_del_timer(&ctx->shared.timer);
    }

    if (reply && reply->type == REDIS_REPLY_ARRAY && reply->elements == 5
        && reply->element[0]->type == REDIS_REPLY_STRING
        && reply->element[0]->len <= RATEPOOL_NAME_MAX
        && reply->element[1]->type == REDIS_REPLY_INTEGER
        && reply->element[2]->type == REDIS_REPLY_INTEGER
        && reply->element[3]->type == REDIS_REPLY_INTEGER
        && reply->element[4]->type == REDIS_REPLY_INTEGER
        && reply->element[2]->integer >= 0
        && reply->element[3]->integer >= 0
        && reply->element[4]->integer >= 0
        && reply->element[4]->integer <= reply->element[3]->integer
        && reply->element[3]->integer <= RATEPOOL_USAGE_TOKENS_MAX)
    {
        name.data = (u_char *) reply->element[0]->str;
        name.len = reply->element[0]->len;

        ttl_ms = reply->element[1]->integer;
        turn.bytes = (uint64_t) reply->element[2]->integer;
        turn.total = (uint64_t) reply->element[3]->integer;
        turn.cached = (uint64_t) reply->element[4]->integer;

        if (ttl_ms <= 0 || ttl_ms > RATEPOOL_HOME_TTL_LONG_MS) {
            ttl_ms = RATEPOOL_HOME_TTL_MS;
        }

        orgs = ctx->pool->orgs->elts;
        shpool = ctx->pool->zone->shpool;

        for (i = 0; i < ctx->pool->orgs->nelts; i++) {
            if (orgs[i].model.len == 0 && orgs[i].name.len == name.len
                && ngx_strncmp(orgs[i].name.data, name.data, name.len) == 0)
            {
                ngx_shmtx_lock(&shpool->mutex);
                ngx_http_ratepool_home_learn(ctx->pool->zone,
                                             ctx->conversation, orgs[i].sh,
                                             (uint64_t) ttl_ms, &turn,
                                             ngx_http_ratepool_now_ms());
                ngx_shmtx_unlock(&shpool->mutex);
                break;
            }
        }
    }

    ctx->shared.handler(ctx->shared.data, NGX_OK, 0, 0);
}


/* Redis did not say in time: the zone's word will do */

static void
ngx_http_ratepool_home_timeout(ngx_event_t *ev)
{
    ngx_http_ratepool_ctx_t *ctx = ev->data;

    ngx_http_ratepool_main_conf_t  *rmcf;

    rmcf = ctx->pool->zone->conf;

    if (ctx->shared.home_cmd) {
        ctx->shared.home_cmd->data = NULL;
        ctx->shared.home_cmd = NULL;
    }

    ngx_log_error(NGX_LOG_INFO, ev->log, 0,
                  "ratepool: redis did not say where a conversation's "
                  "cache is in %M ms", rmcf->redis->timeout);

    ngx_http_ratepool_redis_timed_out(ngx_http_ratepool_redis_get(rmcf));

    ctx->shared.handler(ctx->shared.data, NGX_OK, 0, 0);
}


/* the org that answered a turn is the conversation's home for the fleet */

static void
ngx_http_ratepool_shared_homed(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_ratepool_org_t *org, uint64_t ttl_ms, ratepool_turn_t *turn)
{
    ngx_http_ratepool_redis_t      *redis;
    ngx_http_ratepool_call_t        call;
    ngx_http_ratepool_main_conf_t  *rmcf;

    rmcf = ctx->pool->zone->conf;
    redis = ngx_http_ratepool_redis_get(rmcf);

    if (!ngx_http_ratepool_redis_usable(redis)) {
        return;
    }

    call.n = 0;
    call.p = call.buf;

    ngx_http_ratepool_call_int(&call, 1);
    ngx_http_ratepool_home_key(&call, rmcf->redis, ctx->conversation);
    ngx_http_ratepool_call_str(&call, (u_char *) "H", 1);
    ngx_http_ratepool_call_str(&call, org->name.data, org->name.len);
    ngx_http_ratepool_call_int(&call, (int64_t) ttl_ms);
    ngx_http_ratepool_call_int(&call, (int64_t) turn->bytes);
    ngx_http_ratepool_call_int(&call, (int64_t) turn->total);
    ngx_http_ratepool_call_int(&call, (int64_t) turn->cached);

    (void) ngx_http_ratepool_redis_script(redis, call.args, call.n, 2, NULL,
                                          NULL);
}


/*
 * Takes the admitted request's cost in Redis.  NGX_OK: taken on the copy,
 * sent later.  NGX_AGAIN: asked, the answer goes to handler(data, ...).
 * Redis cannot be asked now: NGX_DECLINED, the request is decided
 * without it, or NGX_ERROR with redis_fail=closed.
 */

static ngx_int_t
ngx_http_ratepool_shared_take(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_ratepool_taken_pt handler, void *data)
{
    ngx_uint_t                      i;
    ngx_http_request_t             *r;
    ngx_http_ratepool_org_t        *org;
    ngx_http_ratepool_redis_t      *redis;
    ngx_http_ratepool_call_t        call;
    ngx_http_ratepool_workspace_t  *ws;
    ngx_http_ratepool_main_conf_t  *rmcf;

    rmcf = ctx->pool->zone->conf;
    redis = ngx_http_ratepool_redis_get(rmcf);
    r = ctx->request;

    if (ctx->shared.cmd) {
        /* an earlier take's answer, should it come, finds nobody */
        ctx->shared.cmd->data = NULL;
        ctx->shared.cmd = NULL;
    }

    ctx->shared.late = 0;
    ctx->shared.alone = 0;
    ctx->shared.handler = handler;
    ctx->shared.data = data;

    if (!ngx_http_ratepool_redis_usable(redis)) {
        return ngx_http_ratepool_shared_fallback(ctx);
    }

    org = ngx_http_ratepool_ctx_org(ctx, ctx->key);

    if (rmcf->redis->lease && ngx_http_ratepool_shared_fast(ctx, org) == NGX_OK)
    {
        ctx->shared.taken = 1;
        ctx->shared.org = org;
        ctx->shared.input = ctx->held_input;
        ctx->shared.output = ctx->output_cost;

        (void) ngx_atomic_fetch_add(&ctx->pool->zone->sh->redis_fast, 1);

        return NGX_OK;
    }

    ngx_http_ratepool_call_start(&call, rmcf->redis, ctx->workspace, org,
                                 "t");
    ngx_http_ratepool_call_int(&call, 1);
    ngx_http_ratepool_call_int(&call,
                   (int64_t) ctx->held_input);
    ngx_http_ratepool_call_int(&call, (int64_t) ctx->output_cost);
    ngx_http_ratepool_call_int(&call, 0);

    if (rmcf->redis->lease) {
        ngx_http_ratepool_blocks(ctx, org, ctx->shared.block);

    } else {
        ngx_memzero(ctx->shared.block, sizeof(ctx->shared.block));
    }

    for (i = 0; i < 6; i++) {
        ngx_http_ratepool_call_int(&call, (int64_t) ctx->shared.block[i]);
    }

    /* the budgets in money, which the fleet's spending is held to */
    ws = ctx->workspace;
    ngx_http_ratepool_call_int(&call, ws ? (int64_t) ws->daily_cost : 0);
    ngx_http_ratepool_call_int(&call, ws ? (int64_t) ws->monthly_cost : 0);

    ctx->shared.cmd = ngx_http_ratepool_redis_script(redis, call.args,
                                              call.n, 3,
                                              ngx_http_ratepool_shared_taken,
                                              ctx);
    if (ctx->shared.cmd == NULL) {
        return ngx_http_ratepool_shared_fallback(ctx);
    }

    ctx->shared.asks++;
    ctx->shared.takes++;
    ctx->shared.late = 0;
    ctx->shared.org = org;
    ctx->shared.input = ctx->held_input;
    ctx->shared.output = ctx->output_cost;

    ctx->shared.timer.handler = ngx_http_ratepool_shared_timeout;
    ctx->shared.timer.data = ctx;
    ctx->shared.timer.log = r->connection->log;
    ngx_add_timer(&ctx->shared.timer, rmcf->redis->timeout);

    return NGX_AGAIN;
}


/* Redis cannot decide for this request: redis_fail= says what follows */

static ngx_int_t
ngx_http_ratepool_shared_fallback(ngx_http_ratepool_ctx_t *ctx)
{
    ngx_http_ratepool_main_conf_t  *rmcf;

    rmcf = ctx->pool->zone->conf;

    (void) ngx_atomic_fetch_add(&ctx->pool->zone->sh->redis_fallbacks, 1);

    if (rmcf->redis->fail == RATEPOOL_REDIS_FAIL_CLOSED) {
        return NGX_ERROR;
    }

    ctx->shared.alone = 1;

    return NGX_DECLINED;
}


/* the take's answer, to whoever asked: NGX_ERROR as redis_fail= says */

static void
ngx_http_ratepool_shared_done(ngx_http_ratepool_ctx_t *ctx, ngx_int_t rc,
    uint64_t wait_ms, ngx_uint_t mask)
{
    ngx_log_debug4(NGX_LOG_DEBUG_HTTP, ctx->request->connection->log, 0,
                   "ratepool: redis answered the take: %i, wait %uL ms, "
                   "full: %ui, ask %ui", rc, wait_ms, mask, ctx->shared.asks);

    if (rc == NGX_ERROR) {
        rc = ngx_http_ratepool_shared_fallback(ctx);
    }

    ctx->shared.handler(ctx->shared.data, rc, wait_ms, mask);
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

    /*
     * No count ratepool keeps comes near 10^15: a larger one is a lie;
     * but money, in nano-dollars, which budgets of up to a billion
     * dollars may reach 10^18 in.
     */

    for (i = 0; i < reply->elements; i++) {
        if (reply->element[i]->type != REDIS_REPLY_INTEGER
            || reply->element[i]->integer < 0
            || reply->element[i]->integer
               > ((i == RATEPOOL_SCRIPT_DAY_COST
                   || i == RATEPOOL_SCRIPT_MONTH_COST)
                  ? 2000000000000000000LL : 1000000000000000LL))
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
            ngx_http_ratepool_redis_resend(redis, cmd,
                         ngx_http_ratepool_reply_int(reply,
                                                     RATEPOOL_SCRIPT_LEASED)
                         ? 'U' : 'u');
        }

        return;
    }

    ctx->shared.cmd = NULL;

    if (ctx->shared.timer.timer_set) {
        ngx_del_timer(&ctx->shared.timer);
    }

    if (valid != NGX_OK) {
        if (!ctx->shared.late) {
            ngx_http_ratepool_shared_done(ctx, NGX_ERROR, 0, 0);
        }

        return;
    }

    ngx_http_ratepool_shared_mirror(ctx->pool->zone, ctx->workspace,
                                    ctx->shared.org, reply);

    if (ngx_http_ratepool_reply_int(reply, RATEPOOL_SCRIPT_OK)) {
        ctx->shared.taken = 1;

        if (ngx_http_ratepool_reply_int(reply, RATEPOOL_SCRIPT_LEASED)) {
            ngx_http_ratepool_lease_grant(ctx);
        }

        if (!ctx->shared.late) {
            ngx_http_ratepool_shared_done(ctx, NGX_OK, 0, 0);
        }

        return;
    }

    if (ctx->shared.late && ctx->shared.alone) {
        /*
         * Redis would have refused what went out without its answer: it
         * is charged all the same, or the fleet would count less than
         * the provider does, and send what only one gateway may.
         */
        ngx_http_ratepool_ledger_add(ctx->pool->zone->conf, ctx->workspace,
                                     ctx->shared.org, 1,
                                     (int64_t) ctx->shared.input,
                                     (int64_t) ctx->shared.output, 0, 0);
        ctx->shared.taken = 1;
        return;
    }

    if (!ctx->shared.late) {
        ngx_http_ratepool_shared_done(ctx, NGX_AGAIN,
                       ngx_http_ratepool_reply_int(reply,
                                                   RATEPOOL_SCRIPT_WAIT_MS),
                       ngx_http_ratepool_reply_int(reply,
                                                   RATEPOOL_SCRIPT_MASK));
    }
}


/*
 * What Redis leased along with a take is the gateway's; what is left of
 * it after a second goes back.
 */

static void
ngx_http_ratepool_lease_grant(ngx_http_ratepool_ctx_t *ctx)
{
    uint64_t                           now_ms, *block;
    ngx_http_ratepool_ledger_t        *ledger;
    ngx_uint_t                         d;
    ngx_slab_pool_t                   *shpool;
    ngx_http_ratepool_org_sh_t        *osh;
    ngx_http_ratepool_workspace_sh_t  *wsh;

    block = ctx->shared.block;
    wsh = ctx->workspace->sh;
    osh = ctx->shared.org->sh;
    shpool = ctx->pool->zone->shpool;
    now_ms = ngx_http_ratepool_now_ms();

    ngx_shmtx_lock(&shpool->mutex);

    for (d = 0; d < RATEPOOL_DIMS; d++) {
        wsh->lim.lease[d] += block[d];
        osh->lim.lease[d] += block[RATEPOOL_DIMS + d];
    }

    wsh->lim.lease_asked_ms = 0;
    osh->lim.lease_asked_ms = 0;

    if (!ratepool_dims_zero(block)) {
        wsh->lim.lease_until_ms = now_ms + RATEPOOL_SHARED_LEASE_MS;
    }

    if (!ratepool_dims_zero(&block[RATEPOOL_DIMS])) {
        osh->lim.lease_until_ms = now_ms + RATEPOOL_SHARED_LEASE_MS;
    }

    ngx_shmtx_unlock(&shpool->mutex);

    ledger = ((ngx_http_ratepool_main_conf_t *) ctx->pool->zone->conf)
             ->redis->ledger;

    if (!ledger->expire.timer_set) {
        ngx_add_timer(&ledger->expire, RATEPOOL_SHARED_LEASE_MS + 10);
    }
}


static void
ngx_http_ratepool_lease_timer(ngx_event_t *ev)
{
    ngx_http_ratepool_ledger_t *ledger = ev->data;

    if (ngx_http_ratepool_shared_expire(ledger->rmcf)) {
        ngx_add_timer(ev, RATEPOOL_SHARED_LEASE_MS);
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

    ctx->shared.late = 1;

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
ngx_http_ratepool_shared_mirror(ngx_http_ratepool_zone_t *zone,
    ngx_http_ratepool_workspace_t *ws, ngx_http_ratepool_org_t *org,
    redisReply *reply)
{
    time_t                             now;
    uint64_t                           now_ms, ms, mask, n,
                                       limits[RATEPOOL_DIMS],
                                       ws_limits[RATEPOOL_DIMS];
    ngx_uint_t                         i;
    ngx_slab_pool_t                   *shpool;
    ratepool_bucket_t                 *bucket[RATEPOOL_DIMS];
    ngx_http_ratepool_org_sh_t        *osh;
    ngx_http_ratepool_learned_t       *learned;
    ngx_http_ratepool_workspace_sh_t  *wsh;

    shpool = zone->shpool;
    now = ngx_time();
    now_ms = ngx_http_ratepool_now_ms();

    ms = ngx_http_ratepool_reply_int(reply, RATEPOOL_SCRIPT_WAIT_MS);
    mask = ngx_http_ratepool_reply_int(reply, RATEPOOL_SCRIPT_MASK);

    ngx_shmtx_lock(&shpool->mutex);

    if (org == NULL) {
        goto workspace;
    }

    osh = org->sh;
    n = ngx_http_ratepool_reply_int(reply, RATEPOOL_SCRIPT_COOLDOWN_MS);

    if (n) {
        osh->cooldown_until_ms = ngx_max(osh->cooldown_until_ms,
                                         now_ms + ngx_min(n,
                                                  RATEPOOL_COOLDOWN_MAX_MS));
    }

    for (i = 0; i < RATEPOOL_DIMS; i++) {
        learned = &osh->requests + i;
        n = ngx_http_ratepool_reply_int(reply, RATEPOOL_SCRIPT_LEARNED + i);

        if (n && learned->limit == 0) {
            learned->limit = n;
        }
    }

    /* what is left of the org's buckets, as Redis counts them */

    ngx_http_ratepool_org_buckets(org, bucket, limits);

    for (i = 0; i < RATEPOOL_DIMS; i++) {
        n = ngx_http_ratepool_reply_int(reply, RATEPOOL_SCRIPT_ORG_LEFT + i);
        ratepool_bucket_init(&osh->lim.shared_left[i], limits[i], now_ms);
        ratepool_bucket_clamp(&osh->lim.shared_left[i], limits[i], n, now_ms);
    }

    osh->lim.shared_seen_ms = now_ms;

    if (mask & RATEPOOL_DENY_ORG) {
        osh->lim.busy_until_ms = now_ms + ms;
        osh->lim.busy_seen_ms = now_ms;
    }

workspace:

    if (ws == NULL) {
        goto done;
    }

    wsh = ws->sh;

    /* the fleet's tokens and spending, where Redis knows of more */
    ratepool_budget_raise(&wsh->today, RATEPOOL_BUDGET_DAY, now,
                          ngx_http_ratepool_reply_int(reply,
                                                  RATEPOOL_SCRIPT_DAY_USED));
    ratepool_budget_raise(&wsh->this_month, RATEPOOL_BUDGET_MONTH, now,
                          ngx_http_ratepool_reply_int(reply,
                                                  RATEPOOL_SCRIPT_MONTH_USED));
    ratepool_budget_raise(&wsh->cost_today, RATEPOOL_BUDGET_DAY, now,
                          ngx_http_ratepool_reply_int(reply,
                                                  RATEPOOL_SCRIPT_DAY_COST));
    ratepool_budget_raise(&wsh->cost_this_month, RATEPOOL_BUDGET_MONTH, now,
                          ngx_http_ratepool_reply_int(reply,
                                                  RATEPOOL_SCRIPT_MONTH_COST));

    ws_limits[RATEPOOL_RPM] = ws->rpm;
    ws_limits[RATEPOOL_ITPM] = ws->itpm;
    ws_limits[RATEPOOL_OTPM] = ws->otpm;

    for (i = 0; i < RATEPOOL_DIMS; i++) {
        n = ngx_http_ratepool_reply_int(reply, RATEPOOL_SCRIPT_WS_LEFT + i);
        ratepool_bucket_init(&wsh->lim.shared_left[i], ws_limits[i], now_ms);
        ratepool_bucket_clamp(&wsh->lim.shared_left[i], ws_limits[i], n,
                              now_ms);
    }

    wsh->lim.shared_seen_ms = now_ms;

    if (mask & RATEPOOL_DENY_WORKSPACE) {
        wsh->lim.busy_until_ms = now_ms + ms;
        wsh->lim.busy_seen_ms = now_ms;
    }

done:

    ngx_shmtx_unlock(&shpool->mutex);
}


/* a later try goes to another org: the charge moves with it */

static void
ngx_http_ratepool_shared_move(ngx_http_ratepool_ctx_t *ctx)
{
    ngx_http_ratepool_org_t        *org;
    ngx_http_ratepool_main_conf_t  *rmcf;

    if (!ctx->shared.taken) {
        return;
    }

    org = ngx_http_ratepool_ctx_org(ctx, ctx->key);

    if (org == ctx->shared.org) {
        return;
    }

    rmcf = ctx->pool->zone->conf;

    /*
     * The org that refused counted the request, not its tokens; the new
     * one is charged what the request costs there (a turn away from its
     * conversation's cache writes all of it), the workspace the
     * difference.
     */

    if (!ctx->shared.kept) {
        ngx_http_ratepool_ledger_add(rmcf, NULL, ctx->shared.org, 0,
                                     -(int64_t) ctx->shared.input,
                                     -(int64_t) ctx->shared.output, 0, 0);
    }

    ngx_http_ratepool_ledger_add(rmcf, NULL, org, 1,
                                 (int64_t) ctx->held_input,
                                 (int64_t) ctx->shared.output, 0, 0);
    ngx_http_ratepool_ledger_add(rmcf, ctx->workspace, NULL, 0,
                                 (int64_t) ctx->held_input
                                 - (int64_t) ctx->shared.input, 0, 0, 0);

    ctx->shared.org = org;
    ctx->shared.input = ctx->held_input;
    ctx->shared.kept = 0;
}


/* what the request really used replaces what was taken for it */

static void
ngx_http_ratepool_shared_usage(ngx_http_ratepool_ctx_t *ctx, uint64_t input,
    uint64_t output, uint64_t total, uint64_t cost)
{
    ngx_http_ratepool_shared_settle(ctx, 0, input, output, total, cost);
}


static void
ngx_http_ratepool_shared_settle(ngx_http_ratepool_ctx_t *ctx,
    int64_t requests, uint64_t input, uint64_t output, uint64_t total,
    uint64_t cost)
{
    if (ctx->shared.cmd) {
        /* the take is still unanswered: it will be undone */
        ctx->shared.cmd->data = NULL;
        ctx->shared.cmd = NULL;
    }

    if (!ctx->shared.taken) {
        return;
    }

    ctx->shared.taken = 0;

    if (ctx->shared.kept) {
        /* the org's share stays: what the provider refused says so */
        ngx_http_ratepool_ledger_add(ctx->pool->zone->conf, NULL,
                                     ctx->shared.org, requests, 0, 0, 0, 0);
        ngx_http_ratepool_ledger_add(ctx->pool->zone->conf, ctx->workspace,
                                     NULL, requests,
                                     (int64_t) input
                                     - (int64_t) ctx->shared.input,
                                     (int64_t) output
                                     - (int64_t) ctx->shared.output,
                                     total, cost);
        ctx->shared.kept = 0;
        return;
    }

    ngx_http_ratepool_ledger_add(ctx->pool->zone->conf, ctx->workspace,
                                 ctx->shared.org, requests,
                                 (int64_t) input - (int64_t) ctx->shared.input,
                                 (int64_t) output
                                 - (int64_t) ctx->shared.output,
                                 total, cost);
}


/* the request ends: tokens taken and never used go back */

static void
ngx_http_ratepool_shared_end(ngx_http_ratepool_ctx_t *ctx)
{
    if (ctx->shared.timer.timer_set) {
        ngx_del_timer(&ctx->shared.timer);
    }

    if (ctx->shared.home_cmd) {
        /* its answer will find nobody */
        ctx->shared.home_cmd->data = NULL;
        ctx->shared.home_cmd = NULL;
    }

    if (ctx->shared.cmd == NULL && !ctx->shared.taken) {
        return;
    }

    /* a request not sent since it was taken gives its request back too */
    ngx_http_ratepool_shared_settle(ctx, ctx->round_tries ? 0 : -1, 0, 0, 0,
                                    0);
}


/*
 * Every key refused the request and it waits again: its tokens go back,
 * and its request to its workspace, which will be charged anew when it
 * is admitted; the orgs that refused it counted its tries.
 */

static void
ngx_http_ratepool_shared_requeue(ngx_http_ratepool_ctx_t *ctx)
{
    ngx_uint_t  taken;

    if (ctx->shared.timer.timer_set) {
        ngx_del_timer(&ctx->shared.timer);
    }

    /* a take still unanswered is undone when its answer comes; it must
       not resume the request a second time */

    taken = ctx->shared.taken;

    ngx_http_ratepool_shared_settle(ctx, 0, 0, 0, 0, 0);

    ctx->shared.late = 0;
    ctx->shared.alone = 0;

    if (taken) {
        ngx_http_ratepool_ledger_add(ctx->pool->zone->conf, ctx->workspace,
                                     NULL, -1, 0, 0, 0, 0);
    }
}


/*
 * Charges are gathered per workspace and org, and sent together: at
 * most one adjustment per pair every RATEPOOL_SHARED_FLUSH_MS.
 */

static void
ngx_http_ratepool_ledger_add(ngx_http_ratepool_main_conf_t *rmcf,
    ngx_http_ratepool_workspace_t *ws, ngx_http_ratepool_org_t *org,
    int64_t requests, int64_t input, int64_t output, uint64_t tokens,
    uint64_t cost)
{
    ngx_uint_t                         index;
    ngx_http_ratepool_ledger_t        *ledger;
    ngx_http_ratepool_entry_ledger_t  *e;

    ledger = rmcf->redis->ledger;

    if (ledger == NULL
        || !ngx_http_ratepool_redis_usable(rmcf->redis->conn))
    {
        /* Redis is down: what it missed, it misses; nothing waits */
        return;
    }

    index = ws ? (ngx_uint_t) (ws - (ngx_http_ratepool_workspace_t *)
                                    rmcf->workspaces.elts) + 1
               : 0;

    e = &ledger->entries[index * ledger->norgs
                         + (org ? org->ledger : ledger->norgs - 1)];

    e->workspace = ws;
    e->org = org;
    e->delta[RATEPOOL_RPM] += requests;
    e->delta[RATEPOOL_ITPM] += input;
    e->delta[RATEPOOL_OTPM] += output;
    e->tokens += tokens;
    e->cost += cost;

    if (!e->dirty) {
        e->dirty = 1;
        ngx_queue_insert_tail(&ledger->dirty, &e->queue);
    }

    if (!ledger->flush.timer_set) {
        ngx_add_timer(&ledger->flush, RATEPOOL_SHARED_FLUSH_MS);
    }
}


static void
ngx_http_ratepool_ledger_flush(ngx_event_t *ev)
{
    ngx_http_ratepool_ledger_t *ledger = ev->data;

    ngx_uint_t                         i;
    ngx_queue_t                       *q;
    ngx_http_ratepool_call_t           call;
    ngx_http_ratepool_main_conf_t     *rmcf;
    ngx_http_ratepool_entry_ledger_t  *e;

    rmcf = ledger->rmcf;

    while (!ngx_queue_empty(&ledger->dirty)) {
        q = ngx_queue_head(&ledger->dirty);
        ngx_queue_remove(q);

        e = ngx_queue_data(q, ngx_http_ratepool_entry_ledger_t, queue);
        e->dirty = 0;

        if (e->delta[RATEPOOL_RPM] == 0 && e->delta[RATEPOOL_ITPM] == 0
            && e->delta[RATEPOOL_OTPM] == 0 && e->tokens == 0
            && e->cost == 0)
        {
            continue;
        }

        ngx_http_ratepool_call_start(&call, rmcf->redis, e->workspace,
                                     e->org, "a");

        for (i = 0; i < RATEPOOL_DIMS; i++) {
            ngx_http_ratepool_call_int(&call, e->delta[i]);
            e->delta[i] = 0;
        }

        ngx_http_ratepool_call_int(&call, (int64_t) e->tokens);
        ngx_http_ratepool_call_int(&call, (int64_t) e->cost);
        e->tokens = 0;
        e->cost = 0;

        (void) ngx_http_ratepool_redis_script(rmcf->redis->conn, call.args,
                                      call.n,
                                      (e->workspace && e->org) ? 3 : 2,
                                      ngx_http_ratepool_shared_adjusted, e);
    }
}


/* an adjustment's answer refreshes the copy, as a take's does */

static void
ngx_http_ratepool_shared_adjusted(ngx_http_ratepool_redis_cmd_t *cmd,
    void *reply)
{
    ngx_http_ratepool_entry_ledger_t *e = cmd->data;

    ngx_http_ratepool_main_conf_t  *rmcf;

    if (ngx_http_ratepool_take_reply(reply) != NGX_OK) {
        return;
    }

    rmcf = ngx_http_cycle_get_module_main_conf(ngx_cycle,
                                               ngx_http_ratepool_module);

    ngx_http_ratepool_shared_mirror(rmcf->shm_zone->data, e->workspace,
                                    e->org, reply);
}


/* a 429 cools the org on every gateway; cooldowns only grow */

static void
ngx_http_ratepool_shared_cool(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_ratepool_org_t *org, uint64_t cooldown_ms)
{
    uint64_t                        limits[RATEPOOL_DIMS];
    ratepool_bucket_t              *bucket[RATEPOOL_DIMS];
    ngx_http_ratepool_redis_t      *redis;
    ngx_http_ratepool_main_conf_t  *rmcf;

    rmcf = ctx->pool->zone->conf;
    redis = ngx_http_ratepool_redis_get(rmcf);

    if (redis == NULL) {
        return;
    }

    /*
     * The provider refused what Redis let through: Redis counts less
     * than the provider does.  What the request took of the org stays
     * taken, which brings the two nearer by at least that much.
     */

    if (ctx->shared.taken && ctx->shared.org == org) {
        ctx->shared.kept = 1;
    }

    ngx_http_ratepool_org_buckets(org, bucket, limits);

    /* before the 429 reaches anyone who might try another gateway */
    if (ngx_http_ratepool_cool_call(redis, rmcf, org, cooldown_ms,
                                    limits[RATEPOOL_RPM]))
    {
        ngx_http_ratepool_redis_send_now(redis);
    }
}


/*
 * An org's cooldown in Redis, which only lengthens; with a requests
 * limit (rpm, else the one Redis learned), its request bucket is emptied.
 */

static ngx_http_ratepool_redis_cmd_t *
ngx_http_ratepool_cool_call(ngx_http_ratepool_redis_t *redis,
    ngx_http_ratepool_main_conf_t *rmcf, ngx_http_ratepool_org_t *org,
    uint64_t cooldown_ms, uint64_t rpm)
{
    ngx_http_ratepool_call_t  call;

    call.n = 0;
    call.p = call.buf;

    ngx_http_ratepool_call_int(&call, 1);
    ngx_http_ratepool_call_key(&call, rmcf->redis, 'o', &org->entry);
    ngx_http_ratepool_call_str(&call, (u_char *) "c", 1);
    ngx_http_ratepool_call_int(&call, (int64_t) cooldown_ms);
    ngx_http_ratepool_call_int(&call, (int64_t) rpm);

    return ngx_http_ratepool_redis_script(redis, call.args, call.n, 2, NULL,
                                          NULL);
}


/*
 * After a reload: the fleet's cooldowns of an org with more than a
 * minute left end, in Redis as in the zone (ngx_http_ratepool_attach()).
 */

static ngx_http_ratepool_redis_cmd_t *
ngx_http_ratepool_uncool_call(ngx_http_ratepool_redis_t *redis,
    ngx_http_ratepool_main_conf_t *rmcf, ngx_http_ratepool_org_t *org)
{
    ngx_http_ratepool_call_t  call;

    call.n = 0;
    call.p = call.buf;

    ngx_http_ratepool_call_int(&call, 1);
    ngx_http_ratepool_call_key(&call, rmcf->redis, 'o', &org->entry);
    ngx_http_ratepool_call_str(&call, (u_char *) "x", 1);
    ngx_http_ratepool_call_int(&call, RATEPOOL_RELOAD_COOL_MS);

    return ngx_http_ratepool_redis_script(redis, call.args, call.n, 2,
                                          ngx_http_ratepool_uncooled, org);
}


static void
ngx_http_ratepool_uncooled(ngx_http_ratepool_redis_cmd_t *cmd, void *data)
{
    redisReply               *reply = data;
    ngx_http_ratepool_org_t  *org;

    org = cmd->data;

    if (reply && reply->type == REDIS_REPLY_INTEGER && reply->integer > 0) {
        ngx_log_error(NGX_LOG_NOTICE, ngx_cycle->log, 0,
                      "ratepool: org \"%V\" was to cool down for %L s more "
                      "in redis, the reload ends it", &org->entry,
                      (int64_t) reply->integer);
    }
}


/* limits and what is left of them, as an answer's headers said */

static void
ngx_http_ratepool_shared_learn(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_ratepool_org_t *org, uint64_t *seen, uint64_t *limits,
    int64_t *remaining)
{
    ngx_http_ratepool_redis_t      *redis;
    ngx_http_ratepool_main_conf_t  *rmcf;

    rmcf = ctx->pool->zone->conf;
    redis = ngx_http_ratepool_redis_get(rmcf);

    if (redis == NULL) {
        return;
    }

    ngx_http_ratepool_learn_call(redis, rmcf, org, seen, limits, remaining,
                                 0);
}


static void
ngx_http_ratepool_learn_call(ngx_http_ratepool_redis_t *redis,
    ngx_http_ratepool_main_conf_t *rmcf, ngx_http_ratepool_org_t *org,
    uint64_t *seen, uint64_t *limits, int64_t *remaining, ngx_uint_t lost)
{
    ngx_uint_t                 i;
    ngx_http_ratepool_call_t   call;

    call.n = 0;
    call.p = call.buf;

    ngx_http_ratepool_call_int(&call, 1);
    ngx_http_ratepool_call_key(&call, rmcf->redis, 'o', &org->entry);
    ngx_http_ratepool_call_str(&call, (u_char *) "l", 1);

    for (i = 0; i < RATEPOOL_DIMS; i++) {
        ngx_http_ratepool_call_int(&call, (int64_t) seen[i]);
    }

    for (i = 0; i < RATEPOOL_DIMS; i++) {
        ngx_http_ratepool_call_int(&call, (int64_t) limits[i]);
    }

    for (i = 0; i < RATEPOOL_DIMS; i++) {
        ngx_http_ratepool_call_int(&call, remaining[i]);
    }

    /* buckets only where Redis lost them (a restart without persistence) */
    ngx_http_ratepool_call_int(&call, lost ? 1 : 0);

    (void) ngx_http_ratepool_redis_script(redis, call.args, call.n, 2, NULL,
                                          NULL);
}


/* leases nobody used, given back every few seconds */

static ngx_uint_t
ngx_http_ratepool_shared_expire(ngx_http_ratepool_main_conf_t *rmcf)
{
    uint64_t                        now_ms;
    ngx_uint_t                      i, j, held;
    ngx_slab_pool_t                *shpool;
    ngx_http_ratepool_org_t        *orgs;
    ngx_http_ratepool_zone_t       *zone;
    ngx_http_ratepool_pool_t      **pools;
    ngx_http_ratepool_workspace_t  *ws;

    zone = rmcf->shm_zone->data;
    shpool = zone->shpool;
    pools = rmcf->pools.elts;
    ws = rmcf->workspaces.elts;
    now_ms = ngx_http_ratepool_now_ms();

    held = 0;

    ngx_shmtx_lock(&shpool->mutex);

    for (i = 0; i < rmcf->workspaces.nelts; i++) {
        held |= ngx_http_ratepool_lease_expire(rmcf, &ws[i], NULL,
                                               ws[i].sh->lim.lease,
                                               ws[i].sh->lim.lease_until_ms,
                                               now_ms);
    }

    for (i = 0; i < rmcf->pools.nelts; i++) {
        orgs = pools[i]->orgs->elts;

        for (j = 0; j < pools[i]->orgs->nelts; j++) {
            held |= ngx_http_ratepool_lease_expire(rmcf, NULL, &orgs[j],
                                           orgs[j].sh->lim.lease,
                                           orgs[j].sh->lim.lease_until_ms,
                                           now_ms);
        }
    }

    ngx_shmtx_unlock(&shpool->mutex);

    return held;
}


/*
 * Every few seconds each worker says its gateway is alive; the number of
 * live gateways is what a gateway divides limits by while Redis is down.
 */

static void
ngx_http_ratepool_shared_beat(ngx_http_ratepool_redis_t *redis, void *data,
    ngx_uint_t connected)
{
    ngx_http_ratepool_main_conf_t *rmcf = data;

    ngx_str_t                    name, id;
    ngx_http_ratepool_call_t     call;
    ngx_http_ratepool_zone_t    *zone;

    (void) ngx_http_ratepool_shared_expire(rmcf);

    if (connected) {
        ngx_http_ratepool_shared_reseed(redis, rmcf);
    }

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


/*
 * A new connection may be to a Redis that restarted with nothing: what
 * this gateway knows of each org is sent, its learned limits, what Redis
 * last said was left of its buckets (as they refilled since), applied
 * only if Redis has nothing of the org, and its cooldown, which only
 * lengthens, so that the fleet does not send the provider what it has no
 * room for because the store forgot.
 */

static void
ngx_http_ratepool_shared_reseed(ngx_http_ratepool_redis_t *redis,
    ngx_http_ratepool_main_conf_t *rmcf)
{
    int64_t                       remaining[RATEPOOL_DIMS];
    uint64_t                      now_ms, level, cooldown_ms,
                                  limits[RATEPOOL_DIMS], seen[RATEPOOL_DIMS];
    ngx_uint_t                    i, j, d, known, uncool;
    ngx_atomic_uint_t             reloaded;
    ratepool_bucket_t            *bucket[RATEPOOL_DIMS];
    ngx_slab_pool_t              *shpool;
    ngx_http_ratepool_org_t      *orgs;
    ngx_http_ratepool_zone_t     *zone;
    ngx_http_ratepool_pool_t    **pools;
    ngx_http_ratepool_org_sh_t   *osh;

    zone = rmcf->shm_zone->data;
    shpool = zone->shpool;
    pools = rmcf->pools.elts;
    now_ms = ngx_http_ratepool_now_ms();

    /*
     * The first worker to reach Redis after a reload, once, and soon
     * after it: a cooldown that began later, while Redis was away, is no
     * reload's to end.
     */
    reloaded = zone->sh->redis_uncool;
    uncool = (reloaded
              && ngx_atomic_cmp_set(&zone->sh->redis_uncool, reloaded, 0)
              && ngx_time() - (time_t) reloaded
                 <= RATEPOOL_RELOAD_COOL_MS / 1000);

    for (i = 0; i < rmcf->pools.nelts; i++) {
        orgs = pools[i]->orgs->elts;

        for (j = 0; j < pools[i]->orgs->nelts; j++) {
            osh = orgs[j].sh;
            known = 0;

            if (uncool) {
                (void) ngx_http_ratepool_uncool_call(redis, rmcf, &orgs[j]);
            }

            ngx_shmtx_lock(&shpool->mutex);

            /* one Redis copied back before it heard of the reload */
            if (uncool
                && osh->cooldown_until_ms > now_ms + RATEPOOL_RELOAD_COOL_MS)
            {
                osh->cooldown_until_ms = 0;
            }

            ngx_http_ratepool_org_buckets(&orgs[j], bucket, limits);

            for (d = 0; d < RATEPOOL_DIMS; d++) {
                remaining[d] = -1;

                /* the limits learned from answers, which Redis keeps */
                seen[d] = (&osh->requests)[d].limit;
                known |= (seen[d] != 0);

                if (limits[d] == 0) {
                    continue;
                }

                /*
                 * Redis's own last word, refilled since: never below what
                 * a Redis that kept its data holds (the zone's buckets
                 * may be a share of the limit, while Redis was down).
                 */

                if (osh->lim.shared_seen_ms == 0
                    || now_ms - osh->lim.shared_seen_ms >= 60000)
                {
                    continue;
                }

                level = ratepool_bucket_level(&osh->lim.shared_left[d],
                                              limits[d], now_ms);

                if (level < limits[d]) {
                    remaining[d] = (int64_t) level;
                    known = 1;
                }
            }

            cooldown_ms = osh->cooldown_until_ms > now_ms
                          ? osh->cooldown_until_ms - now_ms : 0;

            ngx_shmtx_unlock(&shpool->mutex);

            if (known) {
                ngx_http_ratepool_learn_call(redis, rmcf, &orgs[j], seen,
                                             limits, remaining, 1);
            }

            if (cooldown_ms) {
                (void) ngx_http_ratepool_cool_call(redis, rmcf, &orgs[j],
                                                   cooldown_ms, 0);
            }
        }
    }

    ngx_http_ratepool_reseed_budgets(redis, rmcf);
}


/*
 * What this gateway counted of each workspace's day and month goes to a
 * Redis that has less: one that restarted without persistence, or missed
 * the usage of a time it was down.
 */

static void
ngx_http_ratepool_reseed_budgets(ngx_http_ratepool_redis_t *redis,
    ngx_http_ratepool_main_conf_t *rmcf)
{
    time_t                          now;
    uint64_t                        day, month, day_cost, month_cost;
    ngx_uint_t                      i;
    ngx_slab_pool_t                *shpool;
    ngx_http_ratepool_call_t        call;
    ngx_http_ratepool_zone_t       *zone;
    ngx_http_ratepool_workspace_t  *ws;

    zone = rmcf->shm_zone->data;
    shpool = zone->shpool;
    ws = rmcf->workspaces.elts;
    now = ngx_time();

    for (i = 0; i < rmcf->workspaces.nelts; i++) {
        if (!ngx_http_ratepool_has_budget(&ws[i])) {
            continue;
        }

        ngx_shmtx_lock(&shpool->mutex);
        day = ratepool_budget_used(&ws[i].sh->today, RATEPOOL_BUDGET_DAY,
                                   now);
        month = ratepool_budget_used(&ws[i].sh->this_month,
                                     RATEPOOL_BUDGET_MONTH, now);
        day_cost = ratepool_budget_used(&ws[i].sh->cost_today,
                                        RATEPOOL_BUDGET_DAY, now);
        month_cost = ratepool_budget_used(&ws[i].sh->cost_this_month,
                                          RATEPOOL_BUDGET_MONTH, now);
        ngx_shmtx_unlock(&shpool->mutex);

        if (day == 0 && month == 0 && day_cost == 0 && month_cost == 0) {
            continue;
        }

        call.n = 0;
        call.p = call.buf;

        ngx_http_ratepool_call_int(&call, 1);
        ngx_http_ratepool_call_key(&call, rmcf->redis, 'w', &ws[i].name);
        ngx_http_ratepool_call_str(&call, (u_char *) "W", 1);
        ngx_http_ratepool_call_int(&call,
                          ratepool_budget_period(RATEPOOL_BUDGET_DAY, now));
        ngx_http_ratepool_call_int(&call, (int64_t) day);
        ngx_http_ratepool_call_int(&call,
                          ratepool_budget_period(RATEPOOL_BUDGET_MONTH, now));
        ngx_http_ratepool_call_int(&call, (int64_t) month);
        ngx_http_ratepool_call_int(&call, (int64_t) day_cost);
        ngx_http_ratepool_call_int(&call, (int64_t) month_cost);

        (void) ngx_http_ratepool_redis_script(redis, call.args, call.n, 2,
                                              NULL, NULL);
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

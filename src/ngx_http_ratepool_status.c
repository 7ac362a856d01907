
/*
 * Copyright (C) ratepool authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool.h"
#include "ngx_http_ratepool_org.h"
#include "ngx_http_ratepool_reply.h"
#include "ngx_http_ratepool_shm.h"
#include "ngx_http_ratepool_status.h"


/*
 * ratepool_status: the zone's state as JSON (pools, orgs, keys,
 * workspaces, the store), in Prometheus's text format, or as a page for
 * a browser that shows the JSON as it changes.  No secret is ever part
 * of it: keys are named, and shown by fingerprint.
 */


/* upper bounds of one rendered item, names excluded */
#define RATEPOOL_STATUS_HEAD     512
#define RATEPOOL_STATUS_HISTORY  (RATEPOOL_HISTORY_KINDS                      \
                                  * (32 + RATEPOOL_HISTORY                    \
                                          * (NGX_INT64_LEN + 1)))
#define RATEPOOL_STATUS_STORE    1536    /* JSON or Prometheus */
#define RATEPOOL_STATUS_POOL     544
#define RATEPOOL_STATUS_TOKENS   256
#define RATEPOOL_PROM_HEAD       12800  /* the totals and HELP/TYPE lines */
#define RATEPOOL_PROM_LINE       128    /* one sample, names excluded */
#define RATEPOOL_PROM_LABELS     512    /* a sample's labels, names in */
#define RATEPOOL_STATUS_ORG      (1056 + RATEPOOL_STATUS_TOKENS)
#define RATEPOOL_STATUS_KEY      (992 + RATEPOOL_STATUS_TOKENS)
#define RATEPOOL_STATUS_WS       (1024 + RATEPOOL_STATUS_TOKENS)
#define RATEPOOL_STATUS_CLIENT   (160 + RATEPOOL_STATUS_TOKENS)
#define RATEPOOL_STATUS_MODEL    (64 + RATEPOOL_STATUS_TOKENS)

#define RATEPOOL_FORMAT_JSON        0
#define RATEPOOL_FORMAT_PROMETHEUS  1
#define RATEPOOL_FORMAT_HTML        2

/* a key's state, most telling first */
#define RATEPOOL_KEY_DEAD           0
#define RATEPOOL_KEY_SPENT          1
#define RATEPOOL_KEY_REFUSED        2
#define RATEPOOL_KEY_COOLING        3
#define RATEPOOL_KEY_LIMITED        4
#define RATEPOOL_KEY_OK             5
#define RATEPOOL_KEY_STATES         6


static const char  *ngx_http_ratepool_key_states[] = {
    "dead", "spent", "refused", "cooling", "limited", "ok"
};


/* the page, src/ratepool_status.html, as configure made it a C string */
static const u_char  ngx_http_ratepool_page[] =
#include "ngx_http_ratepool_page.h"
    ;


static ngx_uint_t ngx_http_ratepool_status_format(ngx_http_request_t *r);
static ngx_int_t ngx_http_ratepool_status_page(ngx_http_request_t *r);
static ngx_uint_t ngx_http_ratepool_key_state(ngx_http_ratepool_pool_t *pool,
    ngx_http_ratepool_key_t *key, uint64_t now_ms);
static u_char *ngx_http_ratepool_status_history(u_char *p,
    ngx_http_ratepool_shctx_t *sh);
static u_char *ngx_http_ratepool_usd(u_char *p, uint64_t nano);
static ngx_str_t *ngx_http_ratepool_redis_server(
    ngx_http_ratepool_main_conf_t *rmcf, ngx_http_ratepool_shctx_t *sh,
    ngx_str_t *master);
static uint64_t ngx_http_ratepool_oldest_wait_ms(
    ngx_http_ratepool_pool_t *pool, uint64_t now_ms);
static u_char *ngx_http_ratepool_status_money(u_char *p,
    ngx_http_ratepool_main_conf_t *rmcf, ngx_http_ratepool_workspace_t *ws);
static ngx_uint_t ngx_http_ratepool_client_first(
    ngx_http_ratepool_main_conf_t *rmcf, ngx_uint_t i);
static uint64_t ngx_http_ratepool_remaining_ms(uint64_t until_ms,
    uint64_t now_ms);
static size_t ngx_http_ratepool_status_size(
    ngx_http_ratepool_main_conf_t *rmcf, ngx_uint_t prometheus);
static u_char *ngx_http_ratepool_status_store(u_char *p,
    ngx_http_ratepool_main_conf_t *rmcf, ngx_http_ratepool_zone_t *zone);
static u_char *ngx_http_ratepool_status_pool(u_char *p,
    ngx_http_ratepool_pool_t *pool, uint64_t now_ms);
static u_char *ngx_http_ratepool_status_learned(u_char *p, const char *name,
    ngx_http_ratepool_learned_t *learned, time_t now);
static u_char *ngx_http_ratepool_status_tokens(u_char *p,
    ngx_http_ratepool_tokens_t *used);
static u_char *ngx_http_ratepool_status_buckets(u_char *p,
    ratepool_bucket_t **bucket, uint64_t *limits, uint64_t now_ms);
static u_char *ngx_http_ratepool_prom_tokens(u_char *p, const char *name,
    u_char *labels, u_char *last, ngx_http_ratepool_tokens_t *used);
static u_char *ngx_http_ratepool_prom_histogram(u_char *p, const char *name,
    ngx_str_t *pool, ngx_http_ratepool_histogram_t *h,
    const ngx_msec_t *bounds);
static u_char *ngx_http_ratepool_prom_head(u_char *p, const char *name,
    const char *help, const char *type);
static u_char *ngx_http_ratepool_prometheus(u_char *p,
    ngx_http_ratepool_main_conf_t *rmcf, uint64_t now_ms);


static uint64_t
ngx_http_ratepool_remaining_ms(uint64_t until_ms, uint64_t now_ms)
{
    return until_ms > now_ms ? until_ms - now_ms : 0;
}


/*
 * Every worker reads the same zone, so any worker answers for all.
 * The whole document is written under one lock, into a buffer sized
 * beforehand from the configuration, which the zone cannot outgrow.
 */

ngx_int_t
ngx_http_ratepool_status_handler(ngx_http_request_t *r)
{
    u_char                              *p;
    size_t                               size;
    uint64_t                             now_ms, limits[RATEPOOL_DIMS];
    ngx_int_t                            rc;
    ratepool_bucket_t                   *bucket[RATEPOOL_DIMS];
    ngx_buf_t                           *b;
    ngx_uint_t                           i, d, format, prometheus;
    ngx_http_ratepool_zone_t            *zone;
    ngx_http_ratepool_pool_t           **pools;
    ngx_http_ratepool_workspace_t       *ws;
    ngx_http_ratepool_client_t          *client;
    ngx_http_ratepool_main_conf_t       *rmcf;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    rc = ngx_http_discard_request_body(r);

    if (rc != NGX_OK) {
        return rc;
    }

    rmcf = ngx_http_get_module_main_conf(r, ngx_http_ratepool_module);

    if (rmcf->shm_zone == NULL) {
        return NGX_HTTP_NOT_FOUND;
    }

    format = ngx_http_ratepool_status_format(r);

    if (format == RATEPOOL_FORMAT_HTML) {
        return ngx_http_ratepool_status_page(r);
    }

    zone = rmcf->shm_zone->data;
    pools = rmcf->pools.elts;
    ws = rmcf->workspaces.elts;
    prometheus = (format == RATEPOOL_FORMAT_PROMETHEUS);

    size = ngx_http_ratepool_status_size(rmcf, prometheus);

    b = ngx_create_temp_buf(r->pool, size);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = b->last;
    now_ms = ngx_http_ratepool_now_ms();

    ngx_shmtx_lock(&zone->shpool->mutex);

    if (prometheus) {
        b->last = ngx_http_ratepool_prometheus(p, rmcf, now_ms);

        ngx_shmtx_unlock(&zone->shpool->mutex);

        r->headers_out.status = NGX_HTTP_OK;
        ngx_str_set(&r->headers_out.content_type,
                    "text/plain; version=0.0.4");
        r->headers_out.content_type_len = r->headers_out.content_type.len;
        r->headers_out.content_type_lowcase = NULL;

        return ngx_http_ratepool_send_buf(r, b);
    }

    p = ngx_sprintf(p, "{\"version\":\"" RATEPOOL_VERSION "\",\"zone\":\"%V\","
                    "\"now\":%T,\"uptime_sec\":%T,"
                    "\"totals\":{\"requests\":%uL,\"in_flight\":%uL,"
                    "\"rejected_auth\":%uL,\"rejected_workspace\":%uL,"
                    "\"rejected_pool\":%uL,\"rerouted\":%uL},",
                    &rmcf->shm_zone->shm.name, ngx_time(),
                    ngx_time() - zone->sh->started,
                    (uint64_t) zone->sh->requests,
                    (uint64_t) zone->sh->in_flight,
                    (uint64_t) zone->sh->rejected_auth,
                    (uint64_t) zone->sh->rejected_workspace,
                    (uint64_t) zone->sh->rejected_pool,
                    (uint64_t) zone->sh->rerouted);

    p = ngx_sprintf(p, "\"conversations\":{\"homes\":%ui,\"evicted\":%uL,"
                    "\"turns\":{\"new\":%uL,\"home\":%uL,\"moved\":%uL}},",
                    zone->sh->conversations, zone->sh->homes_evicted,
                    zone->sh->turns[RATEPOOL_PLACED_NEW],
                    zone->sh->turns[RATEPOOL_PLACED_HOME],
                    zone->sh->turns[RATEPOOL_PLACED_MOVED]);

    p = ngx_http_ratepool_status_history(p, zone->sh);
    p = ngx_http_ratepool_status_store(p, rmcf, zone);
    p = ngx_cpymem(p, ",\"pools\":[", sizeof(",\"pools\":[") - 1);

    for (i = 0; i < rmcf->pools.nelts; i++) {
        if (i) {
            *p++ = ',';
        }

        p = ngx_http_ratepool_status_pool(p, pools[i], now_ms);
    }

    p = ngx_cpymem(p, "],\"workspaces\":[", sizeof("],\"workspaces\":[") - 1);

    for (i = 0; i < rmcf->workspaces.nelts; i++) {
        for (d = 0; d < RATEPOOL_DIMS; d++) {
            bucket[d] = &ws[i].sh->lim.bucket[d];
        }

        limits[RATEPOOL_RPM] = ws[i].rpm;
        limits[RATEPOOL_ITPM] = ws[i].itpm;
        limits[RATEPOOL_OTPM] = ws[i].otpm;

        p = ngx_sprintf(p, "%s{\"name\":\"%V\",", i ? "," : "",
                        &ws[i].name);
        p = ngx_http_ratepool_status_buckets(p, bucket, limits, now_ms);
        p = ngx_sprintf(p, "\"reserved_input_tokens\":%uL,"
                        "\"reserved_output_tokens\":%uL,"
                        "\"input_bytes_per_token\":%uL,",
                        ws[i].sh->lim.reserved_input,
                        ws[i].sh->lim.reserved_output,
                        (uint64_t) 1024 * 1000
                        / ratepool_estimate_input(1024 * 1000,
                                                  ws[i].sh->input_rate));
        p = ngx_sprintf(p, "\"waiting\":%ui,\"waited\":%uL,",
                        ws[i].sh->waiting, ws[i].sh->waited);
        p = ngx_sprintf(p, "\"admitted\":%uL,"
                        "\"rejected\":%uL,\"daily_tokens\":%ui,"
                        "\"tokens_today\":%uL,\"monthly_tokens\":%ui,"
                        "\"tokens_this_month\":%uL,"
                        "\"budget_reserved_tokens\":%uL,",
                        ws[i].sh->admitted, ws[i].sh->rejected,
                        ws[i].daily_tokens,
                        ratepool_budget_used(&ws[i].sh->today,
                                             RATEPOOL_BUDGET_DAY, ngx_time()),
                        ws[i].monthly_tokens,
                        ratepool_budget_used(&ws[i].sh->this_month,
                                             RATEPOOL_BUDGET_MONTH,
                                             ngx_time()),
                        ws[i].sh->budget_reserved);
        p = ngx_http_ratepool_status_tokens(p, &ws[i].sh->used);
        p = ngx_http_ratepool_status_money(p, rmcf, &ws[i]);
        *p++ = '}';
    }

    p = ngx_cpymem(p, "],\"clients\":[", sizeof("],\"clients\":[") - 1);

    client = rmcf->clients.elts;

    for (i = 0, d = 0; i < rmcf->clients.nelts; i++) {
        if (ngx_http_ratepool_client_first(rmcf, i)) {
            p = ngx_sprintf(p, "%s{\"name\":\"%V\",\"workspace\":\"%V\","
                            "\"requests\":%uA,\"given_429\":%uA,",
                            d++ ? "," : "", &client[i].name,
                            &client[i].workspace_name,
                            client[i].sh->requests, client[i].sh->given_429);
            p = ngx_http_ratepool_status_tokens(p, &client[i].sh->used);
            p = ngx_cpymem(p, ",\"cost_usd\":",
                           sizeof(",\"cost_usd\":") - 1);
            p = ngx_http_ratepool_usd(p, client[i].sh->cost);
            *p++ = '}';
        }
    }

    ngx_shmtx_unlock(&zone->shpool->mutex);

    p = ngx_cpymem(p, "]}\n", 3);

    b->last = p;

    return ngx_http_ratepool_send_json(r, NGX_HTTP_OK, b);
}


/*
 * ?format=json|prometheus|html; without it a browser (Accept: text/html)
 * gets the page, and anything else the JSON.
 */

static ngx_uint_t
ngx_http_ratepool_status_format(ngx_http_request_t *r)
{
    ngx_str_t  format;

    if (ngx_http_arg(r, (u_char *) "format", 6, &format) == NGX_OK) {
        if (format.len == 10
            && ngx_strncmp(format.data, "prometheus", 10) == 0)
        {
            return RATEPOOL_FORMAT_PROMETHEUS;
        }

        if (format.len == 4 && ngx_strncmp(format.data, "html", 4) == 0) {
            return RATEPOOL_FORMAT_HTML;
        }

        return RATEPOOL_FORMAT_JSON;
    }

#if (NGX_HTTP_HEADERS)
    if (r->headers_in.accept
        && ngx_strlcasestrn(r->headers_in.accept->value.data,
                            r->headers_in.accept->value.data
                            + r->headers_in.accept->value.len,
                            (u_char *) "text/html", 9 - 1)
           != NULL)
    {
        return RATEPOOL_FORMAT_HTML;
    }
#endif

    return RATEPOOL_FORMAT_JSON;
}


/*
 * The page is static: it asks this location for the JSON, so that the
 * same allow/deny guard both, and it may load nothing from elsewhere.
 */

static ngx_int_t
ngx_http_ratepool_status_page(ngx_http_request_t *r)
{
    ngx_buf_t        *b;
    ngx_table_elt_t  *h;

    b = ngx_calloc_buf(r->pool);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    b->pos = (u_char *) ngx_http_ratepool_page;
    b->last = b->pos + sizeof(ngx_http_ratepool_page) - 1;
    b->memory = 1;

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "Content-Security-Policy");
    ngx_str_set(&h->value, "default-src 'none'; script-src 'unsafe-inline'; "
                           "style-src 'unsafe-inline'; connect-src 'self'; "
                           "img-src data:");

    r->headers_out.status = NGX_HTTP_OK;
    ngx_str_set(&r->headers_out.content_type, "text/html; charset=utf-8");
    r->headers_out.content_type_len = r->headers_out.content_type.len;
    r->headers_out.content_type_lowcase = NULL;

    return ngx_http_ratepool_send_buf(r, b);
}


/* the last minutes, oldest first: the current step is still counting */

static u_char *
ngx_http_ratepool_status_history(u_char *p, ngx_http_ratepool_shctx_t *sh)
{
    time_t       now, step;
    ngx_uint_t   what;

    static const char  *names[] = { "requests", "rerouted", "upstream_429",
                                    "given_429", "errors" };

    now = ngx_time() / RATEPOOL_HISTORY_STEP;

    p = ngx_sprintf(p, "\"history\":{\"step_sec\":%d",
                    RATEPOOL_HISTORY_STEP);

    for (what = 0; what < RATEPOOL_HISTORY_KINDS; what++) {
        p = ngx_sprintf(p, ",\"%s\":[", names[what]);

        for (step = now - RATEPOOL_HISTORY + 1; step <= now; step++) {
            p = ngx_sprintf(p, "%s%uL", step > now - RATEPOOL_HISTORY + 1
                                        ? "," : "",
                            ngx_http_ratepool_history_get(sh, what, step));
        }

        *p++ = ']';
    }

    return ngx_cpymem(p, "},", 2);
}


/* a workspace's money: spent, its budgets, and by priced model */

static u_char *
ngx_http_ratepool_status_money(u_char *p, ngx_http_ratepool_main_conf_t *rmcf,
    ngx_http_ratepool_workspace_t *ws)
{
    time_t                          now;
    ngx_uint_t                      j, n;
    ngx_http_ratepool_price_t      *price;
    ngx_http_ratepool_spend_sh_t   *spend;

    now = ngx_time();
    price = rmcf->prices.elts;

    p = ngx_cpymem(p, ",\"cost_usd\":", sizeof(",\"cost_usd\":") - 1);
    p = ngx_http_ratepool_usd(p, ws->sh->cost);
    p = ngx_cpymem(p, ",\"daily_usd\":", sizeof(",\"daily_usd\":") - 1);
    p = ngx_http_ratepool_usd(p, ws->daily_cost);
    p = ngx_cpymem(p, ",\"usd_today\":", sizeof(",\"usd_today\":") - 1);
    p = ngx_http_ratepool_usd(p, ratepool_budget_used(&ws->sh->cost_today,
                                                      RATEPOOL_BUDGET_DAY,
                                                      now));
    p = ngx_cpymem(p, ",\"monthly_usd\":", sizeof(",\"monthly_usd\":") - 1);
    p = ngx_http_ratepool_usd(p, ws->monthly_cost);
    p = ngx_cpymem(p, ",\"usd_this_month\":",
                   sizeof(",\"usd_this_month\":") - 1);
    p = ngx_http_ratepool_usd(p, ratepool_budget_used(
                                     &ws->sh->cost_this_month,
                                     RATEPOOL_BUDGET_MONTH, now));
    p = ngx_cpymem(p, ",\"budget_reserved_usd\":",
                   sizeof(",\"budget_reserved_usd\":") - 1);
    p = ngx_http_ratepool_usd(p, ws->sh->cost_reserved);
    p = ngx_cpymem(p, ",\"models\":[", sizeof(",\"models\":[") - 1);

    /* the models it used: a price table lists many */
    for (j = 0, n = 0; j < rmcf->prices.nelts; j++) {
        spend = ws->spend[j];

        if (spend->used.input == 0 && spend->used.output == 0
            && spend->used.cache_read == 0 && spend->used.cache_creation == 0)
        {
            continue;
        }

        p = ngx_sprintf(p, "%s{\"model\":\"%V\",", n++ ? "," : "",
                        &price[j].pattern);
        p = ngx_http_ratepool_status_tokens(p, &spend->used);
        p = ngx_cpymem(p, ",\"cost_usd\":", sizeof(",\"cost_usd\":") - 1);
        p = ngx_http_ratepool_usd(p, spend->cost);
        *p++ = '}';
    }

    *p++ = ']';

    return p;
}


/* the Redis in use: as configured, or where the sentinels said */

static ngx_str_t *
ngx_http_ratepool_redis_server(ngx_http_ratepool_main_conf_t *rmcf,
    ngx_http_ratepool_shctx_t *sh, ngx_str_t *master)
{
    if ((rmcf->redis->nsentinels == 0 && !rmcf->redis->cluster)
        || sh->redis_master_len == 0)
    {
        return &rmcf->redis->server;
    }

    master->data = sh->redis_master;
    master->len = sh->redis_master_len;

    return master;
}


/* dollars of nano-dollars, to the millionth */

static u_char *
ngx_http_ratepool_usd(u_char *p, uint64_t nano)
{
    return ngx_sprintf(p, "%uL.%06uL", nano / RATEPOOL_NANO_PER_USD,
                       nano % RATEPOOL_NANO_PER_USD / 1000);
}


/* how long the pool's oldest waiting request has waited, in all workers */

static uint64_t
ngx_http_ratepool_oldest_wait_ms(ngx_http_ratepool_pool_t *pool,
    uint64_t now_ms)
{
    uint64_t    oldest_ms;
    ngx_uint_t  j;

    oldest_ms = 0;

    for (j = 0; j < RATEPOOL_WORKER_SLOTS; j++) {
        if (pool->sh->oldest_ms[j]
            && (oldest_ms == 0 || pool->sh->oldest_ms[j] < oldest_ms))
        {
            oldest_ms = pool->sh->oldest_ms[j];
        }
    }

    return (oldest_ms && now_ms > oldest_ms) ? now_ms - oldest_ms : 0;
}


/* tokens of one name are one client, shown once */

static ngx_uint_t
ngx_http_ratepool_client_first(ngx_http_ratepool_main_conf_t *rmcf,
    ngx_uint_t i)
{
    ngx_uint_t                   j;
    ngx_http_ratepool_client_t  *client;

    client = rmcf->clients.elts;

    for (j = 0; j < i; j++) {
        if (client[j].sh == client[i].sh) {
            return 0;
        }
    }

    return 1;
}


/* under the zone's lock */

static ngx_uint_t
ngx_http_ratepool_key_state(ngx_http_ratepool_pool_t *pool,
    ngx_http_ratepool_key_t *key, uint64_t now_ms)
{
    uint64_t                     limits[RATEPOOL_DIMS];
    ngx_uint_t                   d;
    ratepool_bucket_t           *bucket[RATEPOOL_DIMS];
    ngx_http_ratepool_org_t     *org;

    org = ngx_http_ratepool_key_org(pool, key);

    if (key->sh->dead_status) {
        return RATEPOOL_KEY_DEAD;
    }

    if (org->sh->spent_until_ms > now_ms) {
        return RATEPOOL_KEY_SPENT;
    }

    if (key->sh->refused_until_ms > now_ms) {
        return RATEPOOL_KEY_REFUSED;
    }

    if (org->sh->cooldown_until_ms > now_ms) {
        return RATEPOOL_KEY_COOLING;
    }

    ngx_http_ratepool_org_buckets(org, bucket, limits);

    for (d = 0; d < RATEPOOL_DIMS; d++) {
        /* an unknown limit (0) never waits */
        if (ratepool_bucket_wait_ms(bucket[d], limits[d], 1, now_ms)) {
            return RATEPOOL_KEY_LIMITED;
        }
    }

    return RATEPOOL_KEY_OK;
}


static size_t
ngx_http_ratepool_status_size(ngx_http_ratepool_main_conf_t *rmcf,
    ngx_uint_t prometheus)
{
    size_t                           size, host;
    ngx_uint_t                       i, j;
    ngx_http_ratepool_org_t         *orgs;
    ngx_http_ratepool_pool_t       **pools;

    pools = rmcf->pools.elts;

    if (prometheus) {
        /* lines per key, org and workspace, each naming them in labels */

        size = RATEPOOL_PROM_HEAD + rmcf->workspaces.nelts
                                    * (15 + 5 * rmcf->prices.nelts)
                                    * (RATEPOOL_PROM_LINE
                                       + 2 * RATEPOOL_NAME_MAX)
               + rmcf->clients.nelts * 8
                 * (RATEPOOL_PROM_LINE + 2 * RATEPOOL_NAME_MAX);

        for (i = 0; i < rmcf->pools.nelts; i++) {
            host = pools[i]->upstream->host.len;

            size += 36 * (RATEPOOL_PROM_LINE + host)
                    + pools[i]->keys->nelts * 23
                    * (RATEPOOL_PROM_LINE + host + 3 * RATEPOOL_NAME_MAX)
                    + pools[i]->orgs->nelts * 14
                      * (RATEPOOL_PROM_LINE + host + RATEPOOL_ENTRY_NAME_MAX);
        }

        return size + RATEPOOL_STATUS_STORE
               + (rmcf->redis ? rmcf->redis->server.len : 0);
    }

    size = RATEPOOL_STATUS_HEAD + RATEPOOL_STATUS_HISTORY
           + RATEPOOL_STATUS_STORE
           + (rmcf->redis ? rmcf->redis->server.len : 0)
           + rmcf->shm_zone->shm.name.len
           + rmcf->workspaces.nelts * (RATEPOOL_STATUS_WS + RATEPOOL_NAME_MAX
                                       + rmcf->prices.nelts
                                         * (RATEPOOL_STATUS_MODEL
                                            + RATEPOOL_NAME_MAX))
           + rmcf->clients.nelts * (RATEPOOL_STATUS_CLIENT
                                    + 2 * RATEPOOL_NAME_MAX);

    for (i = 0; i < rmcf->pools.nelts; i++) {
        size += RATEPOOL_STATUS_POOL + pools[i]->upstream->host.len;

        orgs = pools[i]->orgs->elts;

        for (j = 0; j < pools[i]->orgs->nelts; j++) {
            size += RATEPOOL_STATUS_ORG + orgs[j].entry.len;
        }

        size += pools[i]->keys->nelts
                * (RATEPOOL_STATUS_KEY + 2 * RATEPOOL_NAME_MAX);
    }

    return size;
}


/* where the limits are kept, and how that store is doing */

static u_char *
ngx_http_ratepool_status_store(u_char *p, ngx_http_ratepool_main_conf_t *rmcf,
    ngx_http_ratepool_zone_t *zone)
{
    ngx_str_t                   master;
    ngx_http_ratepool_shctx_t  *sh;
    static const char          *policy[] = { "local", "open", "closed" };

    if (rmcf->redis == NULL) {
        return ngx_sprintf(p, "\"store\":{\"kind\":\"shared_memory\","
                           "\"shared\":false}");
    }

    sh = zone->sh;

    if (rmcf->redis->nsentinels) {
        /* where the sentinels said the master is, and how often it moved */
        p = ngx_sprintf(p, "\"store\":{\"kind\":\"redis\","
                        "\"master\":\"%V\",\"failovers\":%uA,"
                        "\"sentinels\":%ui,",
                        &rmcf->redis->master, sh->redis_failovers,
                        rmcf->redis->nsentinels);

    } else if (rmcf->redis->cluster) {
        /* the node that owns the zone's slot, and how often that moved */
        p = ngx_sprintf(p, "\"store\":{\"kind\":\"redis\","
                        "\"cluster\":true,\"nodes\":%ui,"
                        "\"failovers\":%uA,", rmcf->redis->naddrs,
                        sh->redis_failovers);

    } else {
        p = ngx_cpymem(p, "\"store\":{\"kind\":\"redis\",",
                       sizeof("\"store\":{\"kind\":\"redis\",") - 1);
    }

    return ngx_sprintf(p, "\"server\":\"%V\","
                       "\"tls\":%s,\"state\":\"%s\",\"shared\":%s,"
                       "\"redis_fail\":\"%s\",\"down_since\":%T,"
                       "\"connected_workers\":%uL,\"latency_us\":%uL,"
                       "\"calls\":%uL,\"fast\":%uL,\"errors\":%uL,"
                       "\"timeouts\":%uL,"
                       "\"noscript\":%uL,\"fallbacks\":%uL,"
                       "\"gateways\":%uL,\"local_share\":%uL}",
                       ngx_http_ratepool_redis_server(rmcf, sh, &master),
                       rmcf->redis->tls ? "true" : "false",
                       sh->redis_down ? "down" : "up",
                       sh->redis_down ? "false" : "true",
                       policy[rmcf->redis->fail],
                       sh->redis_down ? (time_t) sh->redis_since : 0,
                       (uint64_t) sh->redis_connected,
                       (uint64_t) sh->redis_latency_us,
                       (uint64_t) sh->redis_calls,
                       (uint64_t) sh->redis_fast,
                       (uint64_t) sh->redis_errors,
                       (uint64_t) sh->redis_timeouts,
                       (uint64_t) sh->redis_noscript,
                       (uint64_t) sh->redis_fallbacks,
                       (uint64_t) sh->gateways,
                       (uint64_t) (sh->local_share > 1 ? sh->local_share
                                                       : 1));
}


static u_char *
ngx_http_ratepool_status_pool(u_char *p, ngx_http_ratepool_pool_t *pool,
    uint64_t now_ms)
{
    uint64_t                     limits[RATEPOOL_DIMS], cooldown_ms, refused_ms,
                                 tpm;
    ratepool_bucket_t           *bucket[RATEPOOL_DIMS];
    ngx_uint_t                   j;
    const char                  *state;
    ngx_http_ratepool_org_t     *orgs, *org;
    ngx_http_ratepool_key_t     *keys;
    ngx_http_ratepool_org_sh_t  *osh;
    ngx_http_ratepool_key_sh_t  *ksh;

    orgs = pool->orgs->elts;
    keys = pool->keys->elts;

    p = ngx_sprintf(p, "{\"name\":\"%V\",\"queue\":{\"limit\":%ui,"
                    "\"waiting\":%ui,\"oldest_wait_ms\":%uL,\"waited\":%uL,"
                    "\"served\":%uL,\"timed_out\":%uL,\"evicted\":%uL,"
                    "\"requeued\":%uL},",
                    &pool->upstream->host, pool->queue_max, pool->sh->waiting,
                    ngx_http_ratepool_oldest_wait_ms(pool, now_ms),
                    pool->sh->waited,
                    pool->sh->served, pool->sh->timed_out, pool->sh->evicted,
                    pool->sh->requeued);

    /* what its clients got, the gateway's answers among them */
    p = ngx_sprintf(p, "\"answers\":{\"2xx\":%uA,\"429\":%uA,\"4xx\":%uA,"
                    "\"5xx\":%uA},\"orgs\":[",
                    pool->sh->answers[RATEPOOL_ANSWER_2XX],
                    pool->sh->answers[RATEPOOL_ANSWER_429],
                    pool->sh->answers[RATEPOOL_ANSWER_4XX],
                    pool->sh->answers[RATEPOOL_ANSWER_5XX]);

    for (j = 0; j < pool->orgs->nelts; j++) {
        org = &orgs[j];
        osh = org->sh;
        ngx_http_ratepool_org_buckets(org, bucket, limits);

        p = ngx_sprintf(p, "%s{\"name\":\"%V\",\"model\":\"%V\","
                        "\"rpm_configured\":%ui,\"itpm_configured\":%ui,"
                        "\"otpm_configured\":%ui,\"tpm_configured\":%ui,"
                        "\"itpm_cache_reads\":%s,",
                        j ? "," : "", &org->name, &org->model, org->rpm,
                        org->itpm, org->otpm, org->tpm,
                        org->cache_reads ? "true" : "false");

        /* one limit for all tokens is shown as that, in its own name */
        tpm = 0;

        if (org->combined) {
            tpm = limits[RATEPOOL_ITPM];
            limits[RATEPOOL_ITPM] = 0;
        }

        p = ngx_http_ratepool_status_buckets(p, bucket, limits, now_ms);
        p = ngx_sprintf(p, "\"tpm_limit\":%uL,\"tpm_available\":%uL,",
                        tpm, tpm ? ratepool_bucket_level(bucket[RATEPOOL_ITPM],
                                                         tpm, now_ms)
                                 : 0);
        p = ngx_sprintf(p, "\"spent_until\":%T,", osh->spent_until_ms > now_ms
                                                  ? osh->spent_until : 0);
        p = ngx_sprintf(p, "\"conversations\":%ui,", osh->homes);
        p = ngx_sprintf(p, "\"cooldown_ms\":%uL,\"in_flight\":%ui,"
                        "\"reserved_input_tokens\":%uL,"
                        "\"reserved_output_tokens\":%uL,\"learned\":{",
                        ngx_http_ratepool_remaining_ms(osh->cooldown_until_ms,
                                                       now_ms),
                        osh->inflight, osh->lim.reserved_input,
                        osh->lim.reserved_output);

        p = ngx_http_ratepool_status_learned(p, "requests", &osh->requests,
                                             ngx_time());
        *p++ = ',';
        p = ngx_http_ratepool_status_learned(p, org->combined
                                                ? "tokens" : "input_tokens",
                                             &osh->input_tokens, ngx_time());
        *p++ = ',';
        p = ngx_http_ratepool_status_learned(p, "output_tokens",
                                             &osh->output_tokens, ngx_time());
        p = ngx_cpymem(p, "},", 2);
        p = ngx_http_ratepool_status_tokens(p, &osh->used);
        p = ngx_cpymem(p, ",\"cost_usd\":", sizeof(",\"cost_usd\":") - 1);
        p = ngx_http_ratepool_usd(p, osh->cost);
        *p++ = '}';
    }

    p = ngx_cpymem(p, "],\"keys\":[", sizeof("],\"keys\":[") - 1);

    for (j = 0; j < pool->keys->nelts; j++) {
        ksh = keys[j].sh;
        org = &orgs[keys[j].org];
        osh = org->sh;
        cooldown_ms = ngx_http_ratepool_remaining_ms(osh->cooldown_until_ms,
                                                     now_ms);

        refused_ms = ngx_http_ratepool_remaining_ms(ksh->refused_until_ms,
                                                    now_ms);
        state = ngx_http_ratepool_key_states[
                    ngx_http_ratepool_key_state(pool, &keys[j], now_ms)];

        p = ngx_sprintf(p, "%s{\"name\":\"%V\",\"org\":\"%V\","
                        "\"provider\":\"%V\",\"fingerprint\":\"%*s\","
                        "\"state\":\"%s\",\"dead_status\":%ui,"
                        "\"dead_since\":%T,"
                        "\"refused_ms\":%uL,\"cooldown_ms\":%uL,"
                        "\"in_flight\":%ui,\"sent\":%uL,"
                        "\"usage_estimated\":%uL,\"responses\":{"
                        "\"2xx\":%uL,\"401\":%uL,\"403\":%uL,\"429\":%uL,"
                        "\"529\":%uL,\"other\":%uL,\"failed\":%uL},"
                        "\"learned_requests_limit\":%uL,"
                        "\"learned_requests_remaining\":%uL,",
                        j ? "," : "", &keys[j].name, &org->name,
                        &keys[j].provider->name,
                        (size_t) RATEPOOL_FINGERPRINT_LEN, ksh->fingerprint,
                        state, ksh->dead_status,
                        ksh->dead_status ? ksh->dead_since : 0,
                        refused_ms, cooldown_ms, ksh->inflight,
                        ksh->sent, ksh->estimated, ksh->status_2xx,
                        ksh->status_401, ksh->status_403,
                        ksh->status_429, ksh->status_529, ksh->status_other,
                        ksh->failed,
                        osh->requests.limit, osh->requests.remaining);
        p = ngx_http_ratepool_status_tokens(p, &ksh->used);
        p = ngx_cpymem(p, ",\"cost_usd\":", sizeof(",\"cost_usd\":") - 1);
        p = ngx_http_ratepool_usd(p, ksh->cost);
        *p++ = '}';
    }

    return ngx_cpymem(p, "]}", 2);
}


static u_char *
ngx_http_ratepool_status_learned(u_char *p, const char *name,
    ngx_http_ratepool_learned_t *learned, time_t now)
{
    return ngx_sprintf(p, "\"%s\":{\"limit\":%uL,\"remaining\":%uL,"
                       "\"reset_in_sec\":%T}", name, learned->limit,
                       learned->remaining,
                       learned->reset > now ? learned->reset - now : 0);
}


static u_char *
ngx_http_ratepool_status_tokens(u_char *p, ngx_http_ratepool_tokens_t *used)
{
    uint64_t  all, permille;

    /* the share of all input that was read from a prompt cache */
    all = used->input + used->cache_read + used->cache_creation;
    permille = all ? used->cache_read * 1000 / all : 0;

    return ngx_sprintf(p, "\"tokens\":{\"input\":%uL,\"output\":%uL,"
                       "\"cache_read\":%uL,\"cache_creation\":%uL},"
                       "\"cache_hit_ratio\":%uL.%03uL",
                       used->input, used->output, used->cache_read,
                       used->cache_creation, permille / 1000,
                       permille % 1000);
}


/* limits in use (0: unknown) and what is left of them, debt showing as 0 */

static u_char *
ngx_http_ratepool_status_buckets(u_char *p, ratepool_bucket_t **bucket,
    uint64_t *limits, uint64_t now_ms)
{
    ngx_uint_t  i;

    static const char  *names[] = { "rpm", "itpm", "otpm" };

    for (i = 0; i < RATEPOOL_DIMS; i++) {
        p = ngx_sprintf(p, "\"%s_limit\":%uL,\"%s_available\":%uL,",
                        names[i], limits[i], names[i],
                        limits[i] ? ratepool_bucket_level(bucket[i], limits[i],
                                                          now_ms)
                                  : 0);
    }

    return p;
}


/*
 * The same state in Prometheus' text format (GET ...?format=prometheus):
 * one family at a time, as the format requires, all under the one lock.
 */

#define RATEPOOL_PROM_KEY_SENT      0
#define RATEPOOL_PROM_KEY_IN_FLIGHT 1
#define RATEPOOL_PROM_KEY_COOLDOWN  2
#define RATEPOOL_PROM_KEY_DEAD      3
#define RATEPOOL_PROM_KEY_FAILED    4
#define RATEPOOL_PROM_KEY_ESTIMATED 5


typedef struct {
    const char                     *name;
    const char                     *help;
    const char                     *type;
    ngx_uint_t                      what;
} ngx_http_ratepool_prom_t;


static ngx_http_ratepool_prom_t  ngx_http_ratepool_prom_keys[] = {
    { "ratepool_key_sent_total", "Requests sent with the key.", "counter",
      RATEPOOL_PROM_KEY_SENT },
    { "ratepool_key_in_flight", "Requests in flight with the key.", "gauge",
      RATEPOOL_PROM_KEY_IN_FLIGHT },
    { "ratepool_key_cooldown_seconds",
      "Seconds until the key's org may be used again.", "gauge",
      RATEPOOL_PROM_KEY_COOLDOWN },
    { "ratepool_key_dead", "1 if the provider refused the key (401).",
      "gauge", RATEPOOL_PROM_KEY_DEAD },
    { "ratepool_key_failed_total", "Tries with no answer.", "counter",
      RATEPOOL_PROM_KEY_FAILED },
    { "ratepool_key_usage_estimated_total",
      "Requests charged an estimate: cut short, unreadable or unanswered.",
      "counter", RATEPOOL_PROM_KEY_ESTIMATED },
    { NULL, NULL, NULL, 0 }
};


static u_char *
ngx_http_ratepool_prom_head(u_char *p, const char *name, const char *help,
    const char *type)
{
    return ngx_sprintf(p, "# HELP %s %s\n# TYPE %s %s\n", name, help, name,
                       type);
}


/* one line a kind of token, after the labels that name whose they are */

static u_char *
ngx_http_ratepool_prom_tokens(u_char *p, const char *name, u_char *labels,
    u_char *last, ngx_http_ratepool_tokens_t *used)
{
    p = ngx_sprintf(p, "%s{%*skind=\"input\"} %uL\n"
                    "%s{%*skind=\"output\"} %uL\n"
                    "%s{%*skind=\"cache_read\"} %uL\n"
                    "%s{%*skind=\"cache_creation\"} %uL\n",
                    name, last - labels, labels, used->input,
                    name, last - labels, labels, used->output,
                    name, last - labels, labels, used->cache_read,
                    name, last - labels, labels, used->cache_creation);
    return p;
}


/* Prometheus's histogram: cumulative buckets, in seconds */

static u_char *
ngx_http_ratepool_prom_histogram(u_char *p, const char *name,
    ngx_str_t *pool, ngx_http_ratepool_histogram_t *h,
    const ngx_msec_t *bounds)
{
    uint64_t    count;
    ngx_uint_t  i;

    count = 0;

    for (i = 0; i < RATEPOOL_HISTOGRAM_BUCKETS; i++) {
        count += h->bucket[i];
        p = ngx_sprintf(p, "%s_bucket{pool=\"%V\",le=\"%M.%03M\"} %uL\n",
                        name, pool, bounds[i] / 1000, bounds[i] % 1000,
                        count);
    }

    count += h->bucket[RATEPOOL_HISTOGRAM_BUCKETS];

    return ngx_sprintf(p, "%s_bucket{pool=\"%V\",le=\"+Inf\"} %uL\n"
                       "%s_sum{pool=\"%V\"} %uA.%03uA\n"
                       "%s_count{pool=\"%V\"} %uL\n",
                       name, pool, count, name, pool, h->sum_ms / 1000,
                       h->sum_ms % 1000, name, pool, count);
}


static u_char *
ngx_http_ratepool_prometheus(u_char *p, ngx_http_ratepool_main_conf_t *rmcf,
    uint64_t now_ms)
{
    uint64_t                         v, limits[RATEPOOL_DIMS],
                                     reserved[RATEPOOL_DIMS];
    ngx_str_t                        master;
    ngx_uint_t                       i, j, k, f;
    ratepool_bucket_t               *bucket[RATEPOOL_DIMS];
    ngx_http_ratepool_org_t         *orgs;
    ngx_http_ratepool_key_t         *keys;
    ngx_http_ratepool_key_sh_t      *ksh;
    ngx_http_ratepool_zone_t        *zone;
    ngx_http_ratepool_pool_t       **pools;
    ngx_http_ratepool_workspace_t   *ws;
    ngx_http_ratepool_client_t      *client;
    ngx_http_ratepool_price_t       *price;
    ngx_http_ratepool_prom_t        *m;

    u_char              *last, labels[RATEPOOL_PROM_LABELS];
    static const char  *classes[] = { "2xx", "401", "403", "429", "529",
                                      "other" };
    static const char  *answers[] = { "2xx", "429", "4xx", "5xx" };
    static const char  *bucket_names[] = { "rpm", "itpm", "otpm" };
    static const char  *org_families[][2] = {
        { "ratepool_org_limit", "Per-minute limit in use (0: unknown)." },
        { "ratepool_org_available", "What is left of each limit now." },
        { "ratepool_org_reserved",
          "Tokens reserved by requests in flight." }
    };

    zone = rmcf->shm_zone->data;
    pools = rmcf->pools.elts;
    ws = rmcf->workspaces.elts;

    p = ngx_http_ratepool_prom_head(p, "ratepool_uptime_seconds",
                                    "Seconds since the zone was made.",
                                    "gauge");
    p = ngx_sprintf(p, "ratepool_uptime_seconds %T\n",
                    ngx_time() - zone->sh->started);

    p = ngx_http_ratepool_prom_head(p, "ratepool_requests_total",
                                    "Requests that reached a pool.",
                                    "counter");
    p = ngx_sprintf(p, "ratepool_requests_total %uL\n",
                    (uint64_t) zone->sh->requests);

    p = ngx_http_ratepool_prom_head(p, "ratepool_in_flight",
                                    "Requests held by a key now.", "gauge");
    p = ngx_sprintf(p, "ratepool_in_flight %uL\n",
                    (uint64_t) zone->sh->in_flight);

    p = ngx_http_ratepool_prom_head(p, "ratepool_rejected_total",
                                    "Requests the gateway answered itself.",
                                    "counter");
    p = ngx_sprintf(p, "ratepool_rejected_total{reason=\"auth\"} %uL\n"
                    "ratepool_rejected_total{reason=\"workspace\"} %uL\n"
                    "ratepool_rejected_total{reason=\"pool\"} %uL\n",
                    (uint64_t) zone->sh->rejected_auth,
                    (uint64_t) zone->sh->rejected_workspace,
                    (uint64_t) zone->sh->rejected_pool);

    p = ngx_http_ratepool_prom_head(p, "ratepool_rerouted_total",
                                    "Requests sent again with another key.",
                                    "counter");
    p = ngx_sprintf(p, "ratepool_rerouted_total %uL\n",
                    (uint64_t) zone->sh->rerouted);

    if (rmcf->redis) {
        p = ngx_http_ratepool_prom_head(p, "ratepool_redis_up",
                                        "1 while limits are shared through "
                                        "Redis, 0 while it is down.",
                                        "gauge");
        p = ngx_sprintf(p, "ratepool_redis_up %d\n",
                        zone->sh->redis_down ? 0 : 1);

        p = ngx_http_ratepool_prom_head(p, "ratepool_redis_info",
                                        "The Redis the limits are shared "
                                        "in, and whether over TLS.", "gauge");
        p = ngx_sprintf(p, "ratepool_redis_info{server=\"%V\",tls=\"%s\"} 1\n",
                        ngx_http_ratepool_redis_server(rmcf, zone->sh,
                                                       &master),
                        rmcf->redis->tls ? "true" : "false");

        p = ngx_http_ratepool_prom_head(p, "ratepool_redis_failovers_total",
                                        "Times the master (of a sentinel's, "
                                        "or a cluster's zone slot) moved.",
                                        "counter");
        p = ngx_sprintf(p, "ratepool_redis_failovers_total %uA\n",
                        zone->sh->redis_failovers);

        p = ngx_http_ratepool_prom_head(p, "ratepool_redis_calls_total",
                                        "Script calls to Redis, and how "
                                        "they ended.", "counter");
        p = ngx_sprintf(p, "ratepool_redis_calls_total{result=\"sent\"} %uL\n"
                        "ratepool_redis_calls_total{result=\"error\"} %uL\n"
                        "ratepool_redis_calls_total{result=\"timeout\"} "
                        "%uL\n"
                        "ratepool_redis_calls_total{result=\"noscript\"} "
                        "%uL\n",
                        (uint64_t) zone->sh->redis_calls,
                        (uint64_t) zone->sh->redis_errors,
                        (uint64_t) zone->sh->redis_timeouts,
                        (uint64_t) zone->sh->redis_noscript);

        p = ngx_http_ratepool_prom_head(p, "ratepool_redis_fast_total",
                                        "Requests admitted on the copy of "
                                        "Redis's buckets.", "counter");
        p = ngx_sprintf(p, "ratepool_redis_fast_total %uL\n",
                        (uint64_t) zone->sh->redis_fast);

        p = ngx_http_ratepool_prom_head(p, "ratepool_redis_fallbacks_total",
                                        "Requests decided without Redis.",
                                        "counter");
        p = ngx_sprintf(p, "ratepool_redis_fallbacks_total %uL\n",
                        (uint64_t) zone->sh->redis_fallbacks);

        p = ngx_http_ratepool_prom_head(p, "ratepool_redis_latency_seconds",
                                        "Moving average of a call's round "
                                        "trip.", "gauge");
        p = ngx_sprintf(p, "ratepool_redis_latency_seconds %uL.%06uL\n",
                        (uint64_t) zone->sh->redis_latency_us / 1000000,
                        (uint64_t) zone->sh->redis_latency_us % 1000000);
    }

    for (m = ngx_http_ratepool_prom_keys; m->name; m++) {
        p = ngx_http_ratepool_prom_head(p, m->name, m->help, m->type);

        for (i = 0; i < rmcf->pools.nelts; i++) {
            keys = pools[i]->keys->elts;
            orgs = pools[i]->orgs->elts;

            for (j = 0; j < pools[i]->keys->nelts; j++) {
                ksh = keys[j].sh;

                switch (m->what) {
                case RATEPOOL_PROM_KEY_SENT:
                    v = ksh->sent;
                    break;
                case RATEPOOL_PROM_KEY_IN_FLIGHT:
                    v = ksh->inflight;
                    break;
                case RATEPOOL_PROM_KEY_COOLDOWN:
                    v = ngx_http_ratepool_remaining_ms(
                          orgs[keys[j].org].sh->cooldown_until_ms, now_ms)
                        / 1000;
                    break;
                case RATEPOOL_PROM_KEY_DEAD:
                    v = ksh->dead_status ? 1 : 0;
                    break;
                case RATEPOOL_PROM_KEY_ESTIMATED:
                    v = ksh->estimated;
                    break;
                default:
                    v = ksh->failed;
                }

                p = ngx_sprintf(p, "%s{pool=\"%V\",key=\"%V\",org=\"%V\"} "
                                "%uL\n", m->name, &pools[i]->upstream->host,
                                &keys[j].name, &orgs[keys[j].org].name, v);
            }
        }
    }

    p = ngx_http_ratepool_prom_head(p, "ratepool_key_responses_total",
                                    "Answers of the provider by status.",
                                    "counter");

    for (i = 0; i < rmcf->pools.nelts; i++) {
        keys = pools[i]->keys->elts;

        for (j = 0; j < pools[i]->keys->nelts; j++) {
            ksh = keys[j].sh;

            for (k = 0; k < 6; k++) {
                v = k == 0 ? ksh->status_2xx : k == 1 ? ksh->status_401
                    : k == 2 ? ksh->status_403 : k == 3 ? ksh->status_429
                    : k == 4 ? ksh->status_529 : ksh->status_other;

                p = ngx_sprintf(p, "ratepool_key_responses_total{pool=\"%V\","
                                "key=\"%V\",status=\"%s\"} %uL\n",
                                &pools[i]->upstream->host, &keys[j].name,
                                classes[k], v);
            }
        }
    }

    p = ngx_http_ratepool_prom_head(p, "ratepool_key_state",
                                    "1 for the state the key is in: ok, "
                                    "limited, cooling, spent, refused or "
                                    "dead.", "gauge");

    for (i = 0; i < rmcf->pools.nelts; i++) {
        keys = pools[i]->keys->elts;
        orgs = pools[i]->orgs->elts;

        for (j = 0; j < pools[i]->keys->nelts; j++) {
            f = ngx_http_ratepool_key_state(pools[i], &keys[j], now_ms);

            for (k = 0; k < RATEPOOL_KEY_STATES; k++) {
                p = ngx_sprintf(p, "ratepool_key_state{pool=\"%V\","
                                "key=\"%V\",org=\"%V\",state=\"%s\"} %d\n",
                                &pools[i]->upstream->host, &keys[j].name,
                                &orgs[keys[j].org].name,
                                ngx_http_ratepool_key_states[k], k == f);
            }
        }
    }

    p = ngx_http_ratepool_prom_head(p, "ratepool_key_tokens_total",
                                    "Tokens the provider reported, by key "
                                    "and kind.", "counter");

    for (i = 0; i < rmcf->pools.nelts; i++) {
        keys = pools[i]->keys->elts;
        orgs = pools[i]->orgs->elts;

        for (j = 0; j < pools[i]->keys->nelts; j++) {
            last = ngx_snprintf(labels, RATEPOOL_PROM_LABELS,
                                "pool=\"%V\",key=\"%V\",org=\"%V\",",
                                &pools[i]->upstream->host, &keys[j].name,
                                &orgs[keys[j].org].name);
            p = ngx_http_ratepool_prom_tokens(p, "ratepool_key_tokens_total",
                                              labels, last,
                                              &keys[j].sh->used);
        }
    }

    p = ngx_http_ratepool_prom_head(p, "ratepool_key_cost_usd_total",
                                    "Dollars at list prices "
                                    "(ratepool_price) of the tokens the "
                                    "provider reported, by key.", "counter");

    for (i = 0; i < rmcf->pools.nelts; i++) {
        keys = pools[i]->keys->elts;
        orgs = pools[i]->orgs->elts;

        for (j = 0; j < pools[i]->keys->nelts; j++) {
            p = ngx_sprintf(p, "ratepool_key_cost_usd_total{pool=\"%V\","
                            "key=\"%V\",org=\"%V\"} ",
                            &pools[i]->upstream->host, &keys[j].name,
                            &orgs[keys[j].org].name);
            p = ngx_http_ratepool_usd(p, keys[j].sh->cost);
            *p++ = '\n';
        }
    }

    for (f = 0; f < 3; f++) {
        p = ngx_http_ratepool_prom_head(p, org_families[f][0],
                                        org_families[f][1], "gauge");

        for (i = 0; i < rmcf->pools.nelts; i++) {
            orgs = pools[i]->orgs->elts;

            for (j = 0; j < pools[i]->orgs->nelts; j++) {
                ngx_http_ratepool_org_buckets(&orgs[j], bucket, limits);
                ngx_http_ratepool_org_split(&orgs[j],
                                            orgs[j].sh->lim.reserved_input,
                                            orgs[j].sh->lim.reserved_output,
                                            reserved);

                /* requests are not reserved, tokens are */
                for (k = (f == 2); k < RATEPOOL_DIMS; k++) {
                    v = limits[k];

                    if (f == 1 && v) {
                        v = ratepool_bucket_level(bucket[k], v, now_ms);

                    } else if (f == 2) {
                        v = reserved[k];
                    }

                    p = ngx_sprintf(p, "%s{pool=\"%V\",org=\"%V\","
                                    "model=\"%V\",bucket=\"%s\"} %uL\n",
                                    org_families[f][0],
                                    &pools[i]->upstream->host,
                                    &orgs[j].name, &orgs[j].model,
                                    (k == 1 && orgs[j].combined)
                                        ? "tpm" : bucket_names[k], v);
                }
            }
        }
    }

    p = ngx_http_ratepool_prom_head(p, "ratepool_org_conversations",
                                    "Conversations whose prompt cache the "
                                    "org holds.", "gauge");

    for (i = 0; i < rmcf->pools.nelts; i++) {
        orgs = pools[i]->orgs->elts;

        for (j = 0; j < pools[i]->orgs->nelts; j++) {
            if (orgs[j].model.len == 0) {
                p = ngx_sprintf(p, "ratepool_org_conversations{pool=\"%V\","
                                "org=\"%V\"} %ui\n",
                                &pools[i]->upstream->host, &orgs[j].name,
                                orgs[j].sh->homes);
            }
        }
    }

    p = ngx_http_ratepool_prom_head(p, "ratepool_org_tokens_total",
                                    "Tokens the provider reported, by kind.",
                                    "counter");

    for (i = 0; i < rmcf->pools.nelts; i++) {
        orgs = pools[i]->orgs->elts;

        for (j = 0; j < pools[i]->orgs->nelts; j++) {
            last = ngx_snprintf(labels, RATEPOOL_PROM_LABELS,
                                "pool=\"%V\",org=\"%V\",model=\"%V\",",
                                &pools[i]->upstream->host, &orgs[j].name,
                                &orgs[j].model);
            p = ngx_http_ratepool_prom_tokens(p, "ratepool_org_tokens_total",
                                              labels, last, &orgs[j].sh->used);
        }
    }

    p = ngx_http_ratepool_prom_head(p, "ratepool_org_cost_usd_total",
                                    "Dollars at list prices, by org.",
                                    "counter");

    for (i = 0; i < rmcf->pools.nelts; i++) {
        orgs = pools[i]->orgs->elts;

        for (j = 0; j < pools[i]->orgs->nelts; j++) {
            p = ngx_sprintf(p, "ratepool_org_cost_usd_total{pool=\"%V\","
                            "org=\"%V\",model=\"%V\"} ",
                            &pools[i]->upstream->host, &orgs[j].name,
                            &orgs[j].model);
            p = ngx_http_ratepool_usd(p, orgs[j].sh->cost);
            *p++ = '\n';
        }
    }

    p = ngx_http_ratepool_prom_head(p, "ratepool_conversation_turns_total",
                                    "Turns of conversations, by where they "
                                    "went: a first turn, home to its cache, "
                                    "or moved away from it.", "counter");
    p = ngx_sprintf(p, "ratepool_conversation_turns_total{placement=\"new\"} "
                    "%uL\n"
                    "ratepool_conversation_turns_total{placement=\"home\"} "
                    "%uL\n"
                    "ratepool_conversation_turns_total{placement=\"moved\"} "
                    "%uL\n",
                    zone->sh->turns[RATEPOOL_PLACED_NEW],
                    zone->sh->turns[RATEPOOL_PLACED_HOME],
                    zone->sh->turns[RATEPOOL_PLACED_MOVED]);

    p = ngx_http_ratepool_prom_head(p, "ratepool_pool_waiting",
                                    "Requests waiting for room in the pool.",
                                    "gauge");

    for (i = 0; i < rmcf->pools.nelts; i++) {
        p = ngx_sprintf(p, "ratepool_pool_waiting{pool=\"%V\"} %ui\n",
                        &pools[i]->upstream->host, pools[i]->sh->waiting);
    }

    p = ngx_http_ratepool_prom_head(p, "ratepool_pool_oldest_wait_seconds",
                                    "How long the request that has waited "
                                    "longest for the pool has waited (0: "
                                    "none waits).", "gauge");

    for (i = 0; i < rmcf->pools.nelts; i++) {
        v = ngx_http_ratepool_oldest_wait_ms(pools[i], now_ms);
        p = ngx_sprintf(p, "ratepool_pool_oldest_wait_seconds{pool=\"%V\"} "
                        "%uL.%03uL\n", &pools[i]->upstream->host, v / 1000,
                        v % 1000);
    }

    p = ngx_http_ratepool_prom_head(p, "ratepool_pool_waited_total",
                                    "Requests that waited, by how it ended.",
                                    "counter");

    for (i = 0; i < rmcf->pools.nelts; i++) {
        p = ngx_sprintf(p, "ratepool_pool_waited_total{pool=\"%V\","
                        "result=\"served\"} %uL\n"
                        "ratepool_pool_waited_total{pool=\"%V\","
                        "result=\"timed_out\"} %uL\n"
                        "ratepool_pool_waited_total{pool=\"%V\","
                        "result=\"evicted\"} %uL\n",
                        &pools[i]->upstream->host, pools[i]->sh->served,
                        &pools[i]->upstream->host, pools[i]->sh->timed_out,
                        &pools[i]->upstream->host, pools[i]->sh->evicted);
    }

    p = ngx_http_ratepool_prom_head(p, "ratepool_pool_requeued_total",
                                    "Requests every key refused after they "
                                    "were sent, put back to wait.",
                                    "counter");

    for (i = 0; i < rmcf->pools.nelts; i++) {
        p = ngx_sprintf(p, "ratepool_pool_requeued_total{pool=\"%V\"} %uL\n",
                        &pools[i]->upstream->host, pools[i]->sh->requeued);
    }

    p = ngx_http_ratepool_prom_head(p, "ratepool_pool_answers_total",
                                    "What the pool's clients were answered, "
                                    "by the provider or the gateway.",
                                    "counter");

    for (i = 0; i < rmcf->pools.nelts; i++) {
        for (k = 0; k < RATEPOOL_ANSWER_CLASSES; k++) {
            p = ngx_sprintf(p, "ratepool_pool_answers_total{pool=\"%V\","
                            "status=\"%s\"} %uA\n",
                            &pools[i]->upstream->host, answers[k],
                            pools[i]->sh->answers[k]);
        }
    }

    p = ngx_http_ratepool_prom_head(p, "ratepool_pool_wait_seconds",
                                    "How long requests waited for room "
                                    "in the pool.", "histogram");

    for (i = 0; i < rmcf->pools.nelts; i++) {
        p = ngx_http_ratepool_prom_histogram(p, "ratepool_pool_wait_seconds",
                                             &pools[i]->upstream->host,
                                             &pools[i]->sh->wait_time,
                                             ngx_http_ratepool_wait_bounds);
    }

    p = ngx_http_ratepool_prom_head(p, "ratepool_pool_added_seconds",
                                    "Time the gateway added to a request: "
                                    "all of it but its waits and the "
                                    "provider's time.", "histogram");

    for (i = 0; i < rmcf->pools.nelts; i++) {
        p = ngx_http_ratepool_prom_histogram(p, "ratepool_pool_added_seconds",
                                             &pools[i]->upstream->host,
                                             &pools[i]->sh->added_time,
                                             ngx_http_ratepool_added_bounds);
    }

    p = ngx_http_ratepool_prom_head(p, "ratepool_workspace_requests_total",
                                    "Requests admitted and rejected.",
                                    "counter");

    for (i = 0; i < rmcf->workspaces.nelts; i++) {
        p = ngx_sprintf(p, "ratepool_workspace_requests_total{workspace=\"%V\","
                        "result=\"admitted\"} %uL\n"
                        "ratepool_workspace_requests_total{workspace=\"%V\","
                        "result=\"rejected\"} %uL\n",
                        &ws[i].name, ws[i].sh->admitted, &ws[i].name,
                        ws[i].sh->rejected);
    }

    p = ngx_http_ratepool_prom_head(p, "ratepool_workspace_tokens_total",
                                    "Tokens the provider reported used.",
                                    "counter");

    for (i = 0; i < rmcf->workspaces.nelts; i++) {
        last = ngx_snprintf(labels, RATEPOOL_PROM_LABELS,
                            "workspace=\"%V\",", &ws[i].name);
        p = ngx_http_ratepool_prom_tokens(p, "ratepool_workspace_tokens_total",
                                          labels, last, &ws[i].sh->used);
    }

    p = ngx_http_ratepool_prom_head(p, "ratepool_client_requests_total",
                                    "Requests that reached a pool, by "
                                    "client (ratepool_client name=).",
                                    "counter");

    client = rmcf->clients.elts;

    for (i = 0; i < rmcf->clients.nelts; i++) {
        if (ngx_http_ratepool_client_first(rmcf, i)) {
            p = ngx_sprintf(p, "ratepool_client_requests_total{client=\"%V\","
                            "workspace=\"%V\"} %uA\n", &client[i].name,
                            &client[i].workspace_name,
                            client[i].sh->requests);
        }
    }

    p = ngx_http_ratepool_prom_head(p, "ratepool_client_given_429_total",
                                    "429s the client was answered, by the "
                                    "provider or the gateway.", "counter");

    for (i = 0; i < rmcf->clients.nelts; i++) {
        if (ngx_http_ratepool_client_first(rmcf, i)) {
            p = ngx_sprintf(p, "ratepool_client_given_429_total{client="
                            "\"%V\",workspace=\"%V\"} %uA\n",
                            &client[i].name, &client[i].workspace_name,
                            client[i].sh->given_429);
        }
    }

    p = ngx_http_ratepool_prom_head(p, "ratepool_client_tokens_total",
                                    "Tokens the provider reported, by "
                                    "client and kind.", "counter");

    for (i = 0; i < rmcf->clients.nelts; i++) {
        if (ngx_http_ratepool_client_first(rmcf, i)) {
            last = ngx_snprintf(labels, RATEPOOL_PROM_LABELS,
                                "client=\"%V\",workspace=\"%V\",",
                                &client[i].name, &client[i].workspace_name);
            p = ngx_http_ratepool_prom_tokens(p,
                                              "ratepool_client_tokens_total",
                                              labels, last,
                                              &client[i].sh->used);
        }
    }

    p = ngx_http_ratepool_prom_head(p, "ratepool_client_cost_usd_total",
                                    "Dollars at list prices, by client.",
                                    "counter");

    for (i = 0; i < rmcf->clients.nelts; i++) {
        if (ngx_http_ratepool_client_first(rmcf, i)) {
            p = ngx_sprintf(p, "ratepool_client_cost_usd_total{client="
                            "\"%V\",workspace=\"%V\"} ", &client[i].name,
                            &client[i].workspace_name);
            p = ngx_http_ratepool_usd(p, client[i].sh->cost);
            *p++ = '\n';
        }
    }

    p = ngx_http_ratepool_prom_head(p, "ratepool_workspace_cost_usd_total",
                                    "Dollars at list prices, by workspace.",
                                    "counter");

    for (i = 0; i < rmcf->workspaces.nelts; i++) {
        p = ngx_sprintf(p, "ratepool_workspace_cost_usd_total{workspace="
                        "\"%V\"} ", &ws[i].name);
        p = ngx_http_ratepool_usd(p, ws[i].sh->cost);
        *p++ = '\n';
    }

    p = ngx_http_ratepool_prom_head(p, "ratepool_workspace_model_tokens_total",
                                    "Tokens the provider reported, by "
                                    "workspace, priced model (the pattern "
                                    "of its ratepool_price) and kind.",
                                    "counter");

    price = rmcf->prices.elts;

    for (i = 0; i < rmcf->workspaces.nelts; i++) {
        for (j = 0; j < rmcf->prices.nelts; j++) {
            last = ngx_snprintf(labels, RATEPOOL_PROM_LABELS,
                                "workspace=\"%V\",model=\"%V\",",
                                &ws[i].name, &price[j].pattern);
            p = ngx_http_ratepool_prom_tokens(p,
                                      "ratepool_workspace_model_tokens_total",
                                      labels, last, &ws[i].spend[j]->used);
        }
    }

    p = ngx_http_ratepool_prom_head(p,
                                    "ratepool_workspace_model_cost_usd_total",
                                    "Dollars at list prices, by workspace "
                                    "and priced model.", "counter");

    for (i = 0; i < rmcf->workspaces.nelts; i++) {
        for (j = 0; j < rmcf->prices.nelts; j++) {
            p = ngx_sprintf(p, "ratepool_workspace_model_cost_usd_total{"
                            "workspace=\"%V\",model=\"%V\"} ", &ws[i].name,
                            &price[j].pattern);
            p = ngx_http_ratepool_usd(p, ws[i].spend[j]->cost);
            *p++ = '\n';
        }
    }

    p = ngx_http_ratepool_prom_head(p, "ratepool_workspace_budget_usd",
                                    "The workspace's spending budget for the "
                                    "day or month (0: none).", "gauge");

    for (i = 0; i < rmcf->workspaces.nelts; i++) {
        for (k = 0; k < 2; k++) {
            p = ngx_sprintf(p, "ratepool_workspace_budget_usd{workspace="
                            "\"%V\",period=\"%s\"} ", &ws[i].name,
                            k ? "month" : "day");
            p = ngx_http_ratepool_usd(p, k ? ws[i].monthly_cost
                                           : ws[i].daily_cost);
            *p++ = '\n';
        }
    }

    p = ngx_http_ratepool_prom_head(p, "ratepool_workspace_budget_used_usd",
                                    "Dollars the workspace spent this UTC "
                                    "day or month.", "gauge");

    for (i = 0; i < rmcf->workspaces.nelts; i++) {
        for (k = 0; k < 2; k++) {
            p = ngx_sprintf(p, "ratepool_workspace_budget_used_usd{workspace="
                            "\"%V\",period=\"%s\"} ", &ws[i].name,
                            k ? "month" : "day");
            p = ngx_http_ratepool_usd(p, k
                      ? ratepool_budget_used(&ws[i].sh->cost_this_month,
                                             RATEPOOL_BUDGET_MONTH, ngx_time())
                      : ratepool_budget_used(&ws[i].sh->cost_today,
                                             RATEPOOL_BUDGET_DAY, ngx_time()));
            *p++ = '\n';
        }
    }

    p = ngx_http_ratepool_prom_head(p, "ratepool_workspace_budget_tokens",
                                    "The workspace's token budget for the "
                                    "day or month (0: none).", "gauge");

    for (i = 0; i < rmcf->workspaces.nelts; i++) {
        p = ngx_sprintf(p, "ratepool_workspace_budget_tokens{workspace="
                        "\"%V\",period=\"day\"} %ui\n"
                        "ratepool_workspace_budget_tokens{workspace="
                        "\"%V\",period=\"month\"} %ui\n",
                        &ws[i].name, ws[i].daily_tokens,
                        &ws[i].name, ws[i].monthly_tokens);
    }

    p = ngx_http_ratepool_prom_head(p, "ratepool_workspace_budget_used_tokens",
                                    "Tokens the workspace used this UTC day "
                                    "or month.", "gauge");

    for (i = 0; i < rmcf->workspaces.nelts; i++) {
        p = ngx_sprintf(p, "ratepool_workspace_budget_used_tokens{workspace="
                        "\"%V\",period=\"day\"} %uL\n"
                        "ratepool_workspace_budget_used_tokens{workspace="
                        "\"%V\",period=\"month\"} %uL\n",
                        &ws[i].name,
                        ratepool_budget_used(&ws[i].sh->today,
                                             RATEPOOL_BUDGET_DAY, ngx_time()),
                        &ws[i].name,
                        ratepool_budget_used(&ws[i].sh->this_month,
                                             RATEPOOL_BUDGET_MONTH,
                                             ngx_time()));
    }

    return p;
}

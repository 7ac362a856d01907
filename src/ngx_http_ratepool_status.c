
/*
 * Copyright (C) ratepool authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool.h"
#include "ngx_http_ratepool_org.h"
#include "ngx_http_ratepool_reply.h"
#include "ngx_http_ratepool_status.h"


/*
 * ratepool_status: the zone's state as JSON (pools, orgs, keys,
 * workspaces, the store) or in Prometheus's text format.  No secret is
 * ever part of it: keys are named, and shown by fingerprint.
 */


/* upper bounds of one rendered item, names excluded */
#define RATEPOOL_STATUS_HEAD     512
#define RATEPOOL_STATUS_STORE    1536    /* JSON or Prometheus */
#define RATEPOOL_STATUS_POOL     416
#define RATEPOOL_STATUS_TOKENS   256
#define RATEPOOL_PROM_HEAD       6400   /* the totals and HELP/TYPE lines */
#define RATEPOOL_PROM_LINE       128    /* one sample, names excluded */
#define RATEPOOL_STATUS_ORG      (1024 + RATEPOOL_STATUS_TOKENS)
#define RATEPOOL_STATUS_KEY      (832 + RATEPOOL_STATUS_TOKENS)
#define RATEPOOL_STATUS_WS       (768 + RATEPOOL_STATUS_TOKENS)


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
    ngx_str_t                            format;
    ratepool_bucket_t                   *bucket[RATEPOOL_DIMS];
    ngx_buf_t                           *b;
    ngx_uint_t                           i, d, prometheus;
    ngx_http_ratepool_zone_t            *zone;
    ngx_http_ratepool_pool_t           **pools;
    ngx_http_ratepool_workspace_t       *ws;
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

    zone = rmcf->shm_zone->data;
    pools = rmcf->pools.elts;
    ws = rmcf->workspaces.elts;

    prometheus = (ngx_http_arg(r, (u_char *) "format", 6, &format) == NGX_OK
                  && format.len == 10
                  && ngx_strncmp(format.data, "prometheus", 10) == 0);

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
                    "\"uptime_sec\":%T,"
                    "\"totals\":{\"requests\":%uL,\"in_flight\":%uL,"
                    "\"rejected_auth\":%uL,\"rejected_workspace\":%uL,"
                    "\"rejected_pool\":%uL,\"rerouted\":%uL},",
                    &rmcf->shm_zone->shm.name, ngx_time() - zone->sh->started,
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
        *p++ = '}';
    }

    ngx_shmtx_unlock(&zone->shpool->mutex);

    p = ngx_cpymem(p, "]}\n", 3);

    b->last = p;

    return ngx_http_ratepool_send_json(r, NGX_HTTP_OK, b);
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

        size = RATEPOOL_PROM_HEAD + rmcf->workspaces.nelts * 6
                                    * (RATEPOOL_PROM_LINE + RATEPOOL_NAME_MAX);

        for (i = 0; i < rmcf->pools.nelts; i++) {
            host = pools[i]->upstream->host.len;

            size += 5 * (RATEPOOL_PROM_LINE + host)
                    + pools[i]->keys->nelts * 10
                    * (RATEPOOL_PROM_LINE + host + 2 * RATEPOOL_NAME_MAX)
                    + pools[i]->orgs->nelts * 13
                      * (RATEPOOL_PROM_LINE + host + RATEPOOL_ENTRY_NAME_MAX);
        }

        return size + RATEPOOL_STATUS_STORE
               + (rmcf->redis ? rmcf->redis->server.len : 0);
    }

    size = RATEPOOL_STATUS_HEAD + RATEPOOL_STATUS_STORE
           + (rmcf->redis ? rmcf->redis->server.len : 0)
           + rmcf->shm_zone->shm.name.len
           + rmcf->workspaces.nelts * (RATEPOOL_STATUS_WS + RATEPOOL_NAME_MAX);

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
    ngx_http_ratepool_shctx_t  *sh;
    static const char          *policy[] = { "local", "open", "closed" };

    if (rmcf->redis == NULL) {
        return ngx_sprintf(p, "\"store\":{\"kind\":\"shared_memory\","
                           "\"shared\":false}");
    }

    sh = zone->sh;

    return ngx_sprintf(p, "\"store\":{\"kind\":\"redis\",\"server\":\"%V\","
                       "\"state\":\"%s\",\"shared\":%s,"
                       "\"redis_fail\":\"%s\",\"down_since\":%T,"
                       "\"connected_workers\":%uL,\"latency_us\":%uL,"
                       "\"calls\":%uL,\"fast\":%uL,\"errors\":%uL,"
                       "\"timeouts\":%uL,"
                       "\"noscript\":%uL,\"fallbacks\":%uL,"
                       "\"gateways\":%uL,\"local_share\":%uL}",
                       &rmcf->redis->server,
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
                                 oldest_ms, tpm;
    ratepool_bucket_t           *bucket[RATEPOOL_DIMS];
    ngx_uint_t                   j;
    const char                  *state;
    ngx_http_ratepool_org_t     *orgs, *org;
    ngx_http_ratepool_key_t     *keys;
    ngx_http_ratepool_org_sh_t  *osh;
    ngx_http_ratepool_key_sh_t  *ksh;

    orgs = pool->orgs->elts;
    keys = pool->keys->elts;

    oldest_ms = 0;

    for (j = 0; j < RATEPOOL_WORKER_SLOTS; j++) {
        if (pool->sh->oldest_ms[j]
            && (oldest_ms == 0 || pool->sh->oldest_ms[j] < oldest_ms))
        {
            oldest_ms = pool->sh->oldest_ms[j];
        }
    }

    p = ngx_sprintf(p, "{\"name\":\"%V\",\"queue\":{\"limit\":%ui,"
                    "\"waiting\":%ui,\"oldest_wait_ms\":%uL,\"waited\":%uL,"
                    "\"served\":%uL,\"timed_out\":%uL,\"evicted\":%uL,"
                    "\"requeued\":%uL},\"orgs\":[",
                    &pool->upstream->host, pool->queue_max, pool->sh->waiting,
                    oldest_ms ? now_ms - oldest_ms : 0, pool->sh->waited,
                    pool->sh->served, pool->sh->timed_out, pool->sh->evicted,
                    pool->sh->requeued);

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
        *p++ = '}';
    }

    p = ngx_cpymem(p, "],\"keys\":[", sizeof("],\"keys\":[") - 1);

    for (j = 0; j < pool->keys->nelts; j++) {
        ksh = keys[j].sh;
        org = &orgs[keys[j].org];
        osh = org->sh;
        ngx_http_ratepool_org_buckets(org, bucket, limits);
        cooldown_ms = ngx_http_ratepool_remaining_ms(osh->cooldown_until_ms,
                                                     now_ms);

        refused_ms = ngx_http_ratepool_remaining_ms(ksh->refused_until_ms,
                                                    now_ms);

        if (ksh->dead_status) {
            state = "dead";

        } else if (osh->spent_until_ms > now_ms) {
            state = "spent";

        } else if (refused_ms) {
            state = "refused";

        } else if (cooldown_ms) {
            state = "cooling";

        } else if (ratepool_bucket_wait_ms(bucket[RATEPOOL_RPM],
                                           limits[RATEPOOL_RPM], 1, now_ms)
                   || ratepool_bucket_wait_ms(bucket[RATEPOOL_ITPM],
                                              limits[RATEPOOL_ITPM], 1, now_ms)
                   || ratepool_bucket_wait_ms(bucket[RATEPOOL_OTPM],
                                              limits[RATEPOOL_OTPM], 1, now_ms))
        {
            /* an unknown limit (0) never waits */
            state = "limited";

        } else {
            state = "ok";
        }

        p = ngx_sprintf(p, "%s{\"name\":\"%V\",\"org\":\"%V\","
                        "\"provider\":\"%V\",\"fingerprint\":\"%*s\","
                        "\"state\":\"%s\",\"dead_status\":%ui,"
                        "\"refused_ms\":%uL,\"cooldown_ms\":%uL,"
                        "\"in_flight\":%ui,\"sent\":%uL,"
                        "\"usage_estimated\":%uL,\"responses\":{"
                        "\"2xx\":%uL,\"429\":%uL,\"529\":%uL,\"other\":%uL,"
                        "\"failed\":%uL},"
                        "\"learned_requests_limit\":%uL,"
                        "\"learned_requests_remaining\":%uL,",
                        j ? "," : "", &keys[j].name, &org->name,
                        &keys[j].provider->name,
                        (size_t) RATEPOOL_FINGERPRINT_LEN, ksh->fingerprint,
                        state, ksh->dead_status, refused_ms, cooldown_ms,
                        ksh->inflight,
                        ksh->sent, ksh->estimated, ksh->status_2xx,
                        ksh->status_429, ksh->status_529, ksh->status_other,
                        ksh->failed,
                        osh->requests.limit, osh->requests.remaining);
        p = ngx_http_ratepool_status_tokens(p, &ksh->used);
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


static u_char *
ngx_http_ratepool_prometheus(u_char *p, ngx_http_ratepool_main_conf_t *rmcf,
    uint64_t now_ms)
{
    uint64_t                         v, limits[RATEPOOL_DIMS],
                                     reserved[RATEPOOL_DIMS];
    ngx_uint_t                       i, j, k, f;
    ratepool_bucket_t               *bucket[RATEPOOL_DIMS];
    ngx_http_ratepool_org_t         *orgs;
    ngx_http_ratepool_key_t         *keys;
    ngx_http_ratepool_key_sh_t      *ksh;
    ngx_http_ratepool_zone_t        *zone;
    ngx_http_ratepool_pool_t       **pools;
    ngx_http_ratepool_workspace_t   *ws;
    ngx_http_ratepool_prom_t        *m;

    static const char  *classes[] = { "2xx", "429", "529", "other" };
    static const char  *bucket_names[] = { "rpm", "itpm", "otpm" };
    static const char  *token_kinds[] = { "input", "output", "cache_read",
                                          "cache_creation" };
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

            for (k = 0; k < 4; k++) {
                v = k == 0 ? ksh->status_2xx : k == 1 ? ksh->status_429
                    : k == 2 ? ksh->status_529 : ksh->status_other;

                p = ngx_sprintf(p, "ratepool_key_responses_total{pool=\"%V\","
                                "key=\"%V\",status=\"%s\"} %uL\n",
                                &pools[i]->upstream->host, &keys[j].name,
                                classes[k], v);
            }
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
            for (k = 0; k < 4; k++) {
                v = k == 0 ? orgs[j].sh->used.input
                    : k == 1 ? orgs[j].sh->used.output
                    : k == 2 ? orgs[j].sh->used.cache_read
                    : orgs[j].sh->used.cache_creation;

                p = ngx_sprintf(p, "ratepool_org_tokens_total{pool=\"%V\","
                                "org=\"%V\",model=\"%V\",kind=\"%s\"} %uL\n",
                                &pools[i]->upstream->host, &orgs[j].name,
                                &orgs[j].model, token_kinds[k], v);
            }
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
        for (k = 0; k < 4; k++) {
            v = k == 0 ? ws[i].sh->used.input : k == 1 ? ws[i].sh->used.output
                : k == 2 ? ws[i].sh->used.cache_read
                : ws[i].sh->used.cache_creation;

            p = ngx_sprintf(p, "ratepool_workspace_tokens_total{workspace="
                            "\"%V\",kind=\"%s\"} %uL\n", &ws[i].name,
                            token_kinds[k], v);
        }
    }

    return p;
}

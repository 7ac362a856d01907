
/*
 * Copyright (C) ratepool authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool_module.h"


/* upper bounds of one rendered item, names excluded */
#define RATEPOOL_STATUS_HEAD     512
#define RATEPOOL_STATUS_POOL     128
#define RATEPOOL_STATUS_TOKENS   192
#define RATEPOOL_STATUS_ORG      (1024 + RATEPOOL_STATUS_TOKENS)
#define RATEPOOL_STATUS_KEY      (768 + RATEPOOL_STATUS_TOKENS)
#define RATEPOOL_STATUS_WS       (384 + RATEPOOL_STATUS_TOKENS)


static uint64_t ngx_http_ratepool_remaining_ms(uint64_t until_ms,
    uint64_t now_ms);
static size_t ngx_http_ratepool_status_size(
    ngx_http_ratepool_main_conf_t *rmcf);
static u_char *ngx_http_ratepool_status_pool(u_char *p,
    ngx_http_ratepool_pool_t *pool, uint64_t now_ms);
static u_char *ngx_http_ratepool_status_learned(u_char *p, const char *name,
    ngx_http_ratepool_learned_t *learned, time_t now);
static u_char *ngx_http_ratepool_status_tokens(u_char *p,
    ngx_http_ratepool_tokens_t *used);
static u_char *ngx_http_ratepool_status_buckets(u_char *p,
    ratepool_bucket_t **bucket, uint64_t *limits, uint64_t now_ms);


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
    uint64_t                             now_ms, limits[3];
    ngx_int_t                            rc;
    ratepool_bucket_t                   *bucket[3];
    ngx_buf_t                           *b;
    ngx_uint_t                           i;
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

    size = ngx_http_ratepool_status_size(rmcf);

    b = ngx_create_temp_buf(r->pool, size);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = b->last;
    now_ms = ngx_http_ratepool_now_ms();

    ngx_shmtx_lock(&zone->shpool->mutex);

    p = ngx_sprintf(p, "{\"zone\":\"%V\",\"uptime_sec\":%T,"
                    "\"totals\":{\"requests\":%uL,\"in_flight\":%uL,"
                    "\"rejected_auth\":%uL,\"rejected_workspace\":%uL,"
                    "\"rejected_pool\":%uL,\"rerouted\":%uL},\"pools\":[",
                    &rmcf->shm_zone->shm.name, ngx_time() - zone->sh->started,
                    (uint64_t) zone->sh->requests,
                    (uint64_t) zone->sh->in_flight,
                    (uint64_t) zone->sh->rejected_auth,
                    (uint64_t) zone->sh->rejected_workspace,
                    (uint64_t) zone->sh->rejected_pool,
                    (uint64_t) zone->sh->rerouted);

    for (i = 0; i < rmcf->pools.nelts; i++) {
        if (i) {
            *p++ = ',';
        }

        p = ngx_http_ratepool_status_pool(p, pools[i], now_ms);
    }

    p = ngx_cpymem(p, "],\"workspaces\":[", sizeof("],\"workspaces\":[") - 1);

    for (i = 0; i < rmcf->workspaces.nelts; i++) {
        bucket[0] = &ws[i].sh->rpm_bucket;
        bucket[1] = &ws[i].sh->itpm_bucket;
        bucket[2] = &ws[i].sh->otpm_bucket;
        limits[0] = ws[i].rpm;
        limits[1] = ws[i].itpm;
        limits[2] = ws[i].otpm;

        p = ngx_sprintf(p, "%s{\"name\":\"%V\",", i ? "," : "",
                        &ws[i].name);
        p = ngx_http_ratepool_status_buckets(p, bucket, limits, now_ms);
        p = ngx_sprintf(p, "\"admitted\":%uL,"
                        "\"rejected\":%uL,\"daily_tokens\":%ui,"
                        "\"tokens_today\":%uL,\"monthly_tokens\":%ui,"
                        "\"tokens_this_month\":%uL,",
                        ws[i].sh->admitted, ws[i].sh->rejected,
                        ws[i].daily_tokens,
                        ratepool_budget_used(&ws[i].sh->today,
                                             RATEPOOL_BUDGET_DAY, ngx_time()),
                        ws[i].monthly_tokens,
                        ratepool_budget_used(&ws[i].sh->this_month,
                                             RATEPOOL_BUDGET_MONTH,
                                             ngx_time()));
        p = ngx_http_ratepool_status_tokens(p, &ws[i].sh->used);
        *p++ = '}';
    }

    ngx_shmtx_unlock(&zone->shpool->mutex);

    p = ngx_cpymem(p, "]}\n", 3);

    b->last = p;

    return ngx_http_ratepool_send_json(r, NGX_HTTP_OK, b);
}


static size_t
ngx_http_ratepool_status_size(ngx_http_ratepool_main_conf_t *rmcf)
{
    size_t                           size;
    ngx_uint_t                       i, j;
    ngx_http_ratepool_org_t         *orgs;
    ngx_http_ratepool_pool_t       **pools;

    size = RATEPOOL_STATUS_HEAD + rmcf->shm_zone->shm.name.len
           + rmcf->workspaces.nelts * (RATEPOOL_STATUS_WS + RATEPOOL_NAME_MAX);

    pools = rmcf->pools.elts;

    for (i = 0; i < rmcf->pools.nelts; i++) {
        size += RATEPOOL_STATUS_POOL + pools[i]->upstream->host.len;

        orgs = pools[i]->orgs->elts;

        for (j = 0; j < pools[i]->orgs->nelts; j++) {
            size += RATEPOOL_STATUS_ORG + orgs[j].name.len;
        }

        size += pools[i]->keys->nelts
                * (RATEPOOL_STATUS_KEY + 2 * RATEPOOL_NAME_MAX);
    }

    return size;
}


static u_char *
ngx_http_ratepool_status_pool(u_char *p, ngx_http_ratepool_pool_t *pool,
    uint64_t now_ms)
{
    uint64_t                     limits[3], cooldown_ms, refused_ms;
    ratepool_bucket_t           *bucket[3];
    ngx_uint_t                   j;
    const char                  *state;
    ngx_http_ratepool_org_t     *orgs, *org;
    ngx_http_ratepool_key_t     *keys;
    ngx_http_ratepool_org_sh_t  *osh;
    ngx_http_ratepool_key_sh_t  *ksh;

    static const char  *providers[] = { "anthropic", "openai" };

    orgs = pool->orgs->elts;
    keys = pool->keys->elts;

    p = ngx_sprintf(p, "{\"name\":\"%V\",\"orgs\":[", &pool->upstream->host);

    for (j = 0; j < pool->orgs->nelts; j++) {
        org = &orgs[j];
        osh = org->sh;
        ngx_http_ratepool_org_buckets(org, bucket, limits);

        p = ngx_sprintf(p, "%s{\"name\":\"%V\",\"rpm_configured\":%ui,"
                        "\"itpm_configured\":%ui,\"otpm_configured\":%ui,",
                        j ? "," : "", &org->name, org->rpm, org->itpm,
                        org->otpm);
        p = ngx_http_ratepool_status_buckets(p, bucket, limits, now_ms);
        p = ngx_sprintf(p, "\"cooldown_ms\":%uL,\"in_flight\":%ui,"
                        "\"learned\":{",
                        ngx_http_ratepool_remaining_ms(osh->cooldown_until_ms,
                                                       now_ms),
                        osh->inflight);

        p = ngx_http_ratepool_status_learned(p, "requests", &osh->requests,
                                             ngx_time());
        *p++ = ',';
        p = ngx_http_ratepool_status_learned(p, "input_tokens",
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

        } else if (refused_ms) {
            state = "refused";

        } else if (cooldown_ms) {
            state = "cooling";

        } else if ((limits[0]
                    && ratepool_bucket_wait_ms(bucket[0], limits[0], 1, now_ms))
                   || (limits[1]
                       && ratepool_bucket_wait_ms(bucket[1], limits[1], 1,
                                                  now_ms))
                   || (limits[2]
                       && ratepool_bucket_wait_ms(bucket[2], limits[2], 1,
                                                  now_ms)))
        {
            state = "limited";

        } else {
            state = "ok";
        }

        p = ngx_sprintf(p, "%s{\"name\":\"%V\",\"org\":\"%V\","
                        "\"provider\":\"%s\",\"fingerprint\":\"%*s\","
                        "\"state\":\"%s\",\"dead_status\":%ui,"
                        "\"refused_ms\":%uL,\"cooldown_ms\":%uL,\"in_flight\":%ui,"
                        "\"sent\":%uL,\"responses\":{\"2xx\":%uL,"
                        "\"429\":%uL,\"529\":%uL,\"other\":%uL,"
                        "\"failed\":%uL},\"learned_requests_limit\":%uL,"
                        "\"learned_requests_remaining\":%uL,",
                        j ? "," : "", &keys[j].name, &org->name,
                        providers[keys[j].provider],
                        (size_t) RATEPOOL_FINGERPRINT_LEN, ksh->fingerprint,
                        state, ksh->dead_status, refused_ms, cooldown_ms,
                        ksh->inflight,
                        ksh->sent, ksh->status_2xx, ksh->status_429,
                        ksh->status_529, ksh->status_other, ksh->failed,
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
    return ngx_sprintf(p, "\"tokens\":{\"input\":%uL,\"output\":%uL,"
                       "\"cache_read\":%uL,\"cache_creation\":%uL}",
                       used->input, used->output, used->cache_read,
                       used->cache_creation);
}


/* limits in use (0: unknown) and what is left of them, debt showing as 0 */

static u_char *
ngx_http_ratepool_status_buckets(u_char *p, ratepool_bucket_t **bucket,
    uint64_t *limits, uint64_t now_ms)
{
    ngx_uint_t  i;

    static const char  *names[] = { "rpm", "itpm", "otpm" };

    for (i = 0; i < 3; i++) {
        p = ngx_sprintf(p, "\"%s_limit\":%uL,\"%s_available\":%uL,",
                        names[i], limits[i], names[i],
                        limits[i] ? ratepool_bucket_level(bucket[i], limits[i],
                                                          now_ms)
                                  : 0);
    }

    return p;
}


/*
 * Copyright (C) ratepool authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool.h"
#include "ngx_http_ratepool_home.h"
#include "ngx_http_ratepool_shm.h"


/*
 * The shared memory zone: one entry per org, key, workspace and pool,
 * found by name, kept across reloads when its layout is the same.
 */


/* changes whenever a shared structure does, so a reload cannot mix them */
#define RATEPOOL_SHM_LAYOUT                                                   \
    (3 + (sizeof(ngx_http_ratepool_shctx_t) << 4)                             \
     + (sizeof(ngx_http_ratepool_org_sh_t) << 12)                             \
     + (sizeof(ngx_http_ratepool_key_sh_t) << 20)                             \
     + (sizeof(ngx_http_ratepool_workspace_sh_t) << 28)                       \
     + (sizeof(ngx_http_ratepool_pool_sh_t) << 40)                            \
     + (sizeof(ngx_http_ratepool_queue_sh_t) << 52)                           \
     + (sizeof(ngx_http_ratepool_home_t) << 58))


static void *ngx_http_ratepool_entry(ngx_http_ratepool_zone_t *zone,
    ngx_uint_t kind, ngx_str_t *name, size_t size);
static void ngx_http_ratepool_zone_resized(ngx_shm_zone_t *shm_zone);
static ngx_int_t ngx_http_ratepool_attach(ngx_http_ratepool_zone_t *zone,
    ngx_log_t *log);


/*
 * The zone outlives configurations: on reload the new configuration
 * finds its orgs, keys and workspaces by name and keeps their state,
 * while the old workers go on using the very same entries.
 */

ngx_int_t
ngx_http_ratepool_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_http_ratepool_zone_t  *ozone = data;

    size_t                     len;
    ngx_int_t                  rc;
    ngx_http_ratepool_zone_t  *zone;

    zone = shm_zone->data;
    zone->shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (ozone || shm_zone->shm.exists) {
        zone->sh = zone->shpool->data;

        if (zone->sh->layout != RATEPOOL_SHM_LAYOUT) {
            ngx_log_error(NGX_LOG_EMERG, shm_zone->shm.log, 0,
                          "ratepool zone \"%V\" was made by another build "
                          "of the module, restart nginx instead of "
                          "reloading it", &shm_zone->shm.name);
            return NGX_ERROR;
        }

        /* the fleet's long cooldowns end too, when a worker reaches Redis */
        zone->sh->redis_uncool = (ngx_atomic_uint_t) ngx_time();

    } else {
        ngx_http_ratepool_zone_resized(shm_zone);

        zone->sh = ngx_slab_calloc(zone->shpool,
                                   sizeof(ngx_http_ratepool_shctx_t));
        if (zone->sh == NULL) {
            return NGX_ERROR;
        }

        zone->shpool->data = zone->sh;

        zone->sh->layout = RATEPOOL_SHM_LAYOUT;
        ngx_queue_init(&zone->sh->entries);
        ngx_http_ratepool_home_init(zone->sh);
        zone->sh->started = ngx_time();

        /* this gateway, among those sharing a Redis store */
        ngx_sprintf(zone->sh->gateway, "%08xD%08xD",
                    (uint32_t) ngx_random() ^ (uint32_t) ngx_pid,
                    (uint32_t) ngx_random() ^ (uint32_t) ngx_time());

        len = sizeof(" in ratepool zone \"\"") + shm_zone->shm.name.len;

        zone->shpool->log_ctx = ngx_slab_alloc(zone->shpool, len);
        if (zone->shpool->log_ctx == NULL) {
            return NGX_ERROR;
        }

        ngx_sprintf(zone->shpool->log_ctx, " in ratepool zone \"%V\"%Z",
                    &shm_zone->shm.name);
    }

    ngx_shmtx_lock(&zone->shpool->mutex);
    rc = ngx_http_ratepool_attach(zone, shm_zone->shm.log);
    ngx_shmtx_unlock(&zone->shpool->mutex);

    if (rc != NGX_OK) {
        ngx_log_error(NGX_LOG_EMERG, shm_zone->shm.log, 0,
                      "ratepool zone \"%V\" is too small for its pools and "
                      "workspaces, make it larger", &shm_zone->shm.name);
    }

    return rc;
}


/*
 * A zone made anew while the running configuration has one of its name:
 * a reload with another size, which nginx cannot carry state over.
 */

static void
ngx_http_ratepool_zone_resized(ngx_shm_zone_t *shm_zone)
{
    ngx_uint_t        i;
    ngx_list_part_t  *part;
    ngx_shm_zone_t   *old;

    part = &((ngx_cycle_t *) ngx_cycle)->shared_memory.part;
    old = part->elts;

    for (i = 0; /* void */; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                return;
            }

            part = part->next;
            old = part->elts;
            i = 0;
        }

        if (old[i].tag == shm_zone->tag
            && old[i].shm.name.len == shm_zone->shm.name.len
            && ngx_strncmp(old[i].shm.name.data, shm_zone->shm.name.data,
                           shm_zone->shm.name.len)
               == 0)
        {
            ngx_log_error(NGX_LOG_WARN, shm_zone->shm.log, 0,
                          "ratepool zone \"%V\" is made anew, as its size "
                          "changed from %uz to %uz: its counts, cooldowns, "
                          "learned limits and budgets used today start "
                          "from nothing", &shm_zone->shm.name,
                          old[i].shm.size, shm_zone->shm.size);
            return;
        }
    }
}


static ngx_int_t
ngx_http_ratepool_attach(ngx_http_ratepool_zone_t *zone, ngx_log_t *log)
{
    u_char                          *p;
    uint64_t                         now_ms;
    ngx_str_t                        entry;
    ngx_uint_t                       i, j;
    ngx_http_ratepool_org_t         *org;
    ngx_http_ratepool_key_t         *key;
    ngx_http_ratepool_pool_t       **pools;
    ngx_http_ratepool_workspace_t   *ws;
    ngx_http_ratepool_client_t      *client;
    ngx_http_ratepool_price_t       *price;
    ngx_http_ratepool_main_conf_t   *rmcf;
    u_char                           name[RATEPOOL_ENTRY_NAME_MAX];

    rmcf = zone->conf;
    pools = rmcf->pools.elts;
    now_ms = ngx_http_ratepool_now_ms();

    for (i = 0; i < rmcf->pools.nelts; i++) {

        pools[i]->sh = ngx_http_ratepool_entry(zone, RATEPOOL_ENTRY_POOL,
                                          &pools[i]->upstream->host,
                                          sizeof(ngx_http_ratepool_pool_sh_t));
        if (pools[i]->sh == NULL) {
            return NGX_ERROR;
        }

        ws = rmcf->workspaces.elts;

        for (j = 0; j < rmcf->workspaces.nelts; j++) {
            p = ngx_cpymem(name, pools[i]->upstream->host.data,
                           pools[i]->upstream->host.len);
            *p++ = '/';
            p = ngx_cpymem(p, ws[j].name.data, ws[j].name.len);

            entry.data = name;
            entry.len = p - name;

            pools[i]->queues[j] = ngx_http_ratepool_entry(zone,
                                         RATEPOOL_ENTRY_QUEUE, &entry,
                                         sizeof(ngx_http_ratepool_queue_sh_t));
            if (pools[i]->queues[j] == NULL) {
                return NGX_ERROR;
            }
        }

        org = pools[i]->orgs->elts;

        for (j = 0; j < pools[i]->orgs->nelts; j++) {
            org[j].sh = ngx_http_ratepool_entry(zone, RATEPOOL_ENTRY_ORG,
                                            &org[j].entry,
                                            sizeof(ngx_http_ratepool_org_sh_t));
            if (org[j].sh == NULL) {
                return NGX_ERROR;
            }

            org[j].zone = zone;

            /*
             * A reload clears a cooldown longer than a provider asks
             * for (a retry-after of a date years ahead is capped at an
             * hour, still too long): the operator's way out.  Shorter
             * ones go on.
             */

            if (org[j].sh->cooldown_until_ms
                > now_ms + RATEPOOL_RELOAD_COOL_MS)
            {
                ngx_log_error(NGX_LOG_NOTICE, log, 0,
                              "ratepool: org \"%V\" was to cool down for "
                              "%uL s more, the reload ends it", &org[j].entry,
                              (org[j].sh->cooldown_until_ms - now_ms) / 1000);
                org[j].sh->cooldown_until_ms = 0;
            }
        }

        key = pools[i]->keys->elts;

        for (j = 0; j < pools[i]->keys->nelts; j++) {
            key[j].sh = ngx_http_ratepool_entry(zone, RATEPOOL_ENTRY_KEY,
                                            &key[j].name,
                                            sizeof(ngx_http_ratepool_key_sh_t));
            if (key[j].sh == NULL) {
                return NGX_ERROR;
            }

            /* a reload may change a key's account: its token is fetched
               again */
            key[j].sh->token_len = 0;
            key[j].sh->token_next = 0;
            key[j].sh->token_failures = 0;

            /* a reload puts a refused key back to the test */
            if (key[j].sh->dead_status) {
                ngx_log_error(NGX_LOG_NOTICE, log, 0,
                              "ratepool: key \"%V\" is back in rotation",
                              &key[j].name);
                key[j].sh->dead_status = 0;
            }

            ngx_memcpy(key[j].sh->fingerprint, key[j].fingerprint,
                       RATEPOOL_FINGERPRINT_LEN);
        }
    }

    ws = rmcf->workspaces.elts;
    price = rmcf->prices.elts;

    for (i = 0; i < rmcf->workspaces.nelts; i++) {
        ws[i].sh = ngx_http_ratepool_entry(zone, RATEPOOL_ENTRY_WORKSPACE,
                                      &ws[i].name,
                                      sizeof(ngx_http_ratepool_workspace_sh_t));
        if (ws[i].sh == NULL) {
            return NGX_ERROR;
        }

        /* its use of each priced model, as "workspace/pattern" */
        for (j = 0; j < rmcf->prices.nelts; j++) {
            p = ngx_cpymem(name, ws[i].name.data, ws[i].name.len);
            *p++ = '/';
            p = ngx_cpymem(p, price[j].pattern.data, price[j].pattern.len);

            entry.data = name;
            entry.len = p - name;

            ws[i].spend[j] = ngx_http_ratepool_entry(zone,
                                         RATEPOOL_ENTRY_SPEND, &entry,
                                         sizeof(ngx_http_ratepool_spend_sh_t));
            if (ws[i].spend[j] == NULL) {
                return NGX_ERROR;
            }
        }
    }

    /* tokens of one name are counted as one client */
    client = rmcf->clients.elts;

    for (i = 0; i < rmcf->clients.nelts; i++) {
        client[i].sh = ngx_http_ratepool_entry(zone, RATEPOOL_ENTRY_CLIENT,
                                         &client[i].name,
                                         sizeof(ngx_http_ratepool_client_sh_t));
        if (client[i].sh == NULL) {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


/* with the zone locked: an entry by kind and name, created zeroed */

static void *
ngx_http_ratepool_entry(ngx_http_ratepool_zone_t *zone, ngx_uint_t kind,
    ngx_str_t *name, size_t size)
{
    ngx_queue_t                *q;
    ngx_http_ratepool_entry_t  *e;

    for (q = ngx_queue_head(&zone->sh->entries);
         q != ngx_queue_sentinel(&zone->sh->entries);
         q = ngx_queue_next(q))
    {
        e = ngx_queue_data(q, ngx_http_ratepool_entry_t, queue);

        if (e->kind == kind && e->name_len == name->len
            && ngx_memcmp(e->name, name->data, name->len) == 0)
        {
            return e;
        }
    }

    e = ngx_slab_calloc_locked(zone->shpool, size);
    if (e == NULL) {
        return NULL;
    }

    e->kind = kind;
    e->name_len = name->len;
    ngx_memcpy(e->name, name->data, name->len);

    ngx_queue_insert_tail(&zone->sh->entries, &e->queue);

    return e;
}


/* the histograms' buckets: a queue's waits, and the gateway's own time */

const ngx_msec_t  ngx_http_ratepool_wait_bounds[RATEPOOL_HISTOGRAM_BUCKETS] = {
    100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000
};

const ngx_msec_t  ngx_http_ratepool_added_bounds[RATEPOOL_HISTOGRAM_BUCKETS] =
{
    1, 2, 5, 10, 25, 50, 100, 250, 500, 1000
};


void
ngx_http_ratepool_observe(ngx_http_ratepool_histogram_t *h,
    const ngx_msec_t *bounds, ngx_msec_t ms)
{
    ngx_uint_t  i;

    for (i = 0; i < RATEPOOL_HISTOGRAM_BUCKETS; i++) {
        if (ms <= bounds[i]) {
            break;
        }
    }

    (void) ngx_atomic_fetch_add(&h->bucket[i], 1);
    (void) ngx_atomic_fetch_add(&h->sum_ms, ms);
}


/*
 * A step's slot is taken over by the first worker to count in a new
 * step; counts made in the instant between its taking and its clearing
 * may be lost, which a chart of the last minutes can afford.
 */

void
ngx_http_ratepool_history_count(ngx_http_ratepool_shctx_t *sh,
    ngx_uint_t what)
{
    ngx_uint_t                 i;
    ngx_atomic_uint_t          step, seen;
    ngx_http_ratepool_step_t  *slot;

    step = (ngx_atomic_uint_t) ngx_time() / RATEPOOL_HISTORY_STEP;
    slot = &sh->history[step % RATEPOOL_HISTORY];
    seen = slot->step;

    if (seen != step && ngx_atomic_cmp_set(&slot->step, seen, step)) {
        for (i = 0; i < RATEPOOL_HISTORY_KINDS; i++) {
            slot->count[i] = 0;
        }
    }

    (void) ngx_atomic_fetch_add(&slot->count[what], 1);
}


/* what was counted in a step (ngx_time() / RATEPOOL_HISTORY_STEP) */

uint64_t
ngx_http_ratepool_history_get(ngx_http_ratepool_shctx_t *sh, ngx_uint_t what,
    time_t step)
{
    ngx_http_ratepool_step_t  *slot;

    slot = &sh->history[step % RATEPOOL_HISTORY];

    return slot->step == (ngx_atomic_uint_t) step ? slot->count[what] : 0;
}

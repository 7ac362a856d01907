
/*
 * Copyright (C) ratepool authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool.h"
#include "ngx_http_ratepool_home.h"
#include "ngx_http_ratepool_org.h"
#include "ngx_http_ratepool_pool.h"
#include "ngx_http_ratepool_shm.h"
#include "ngx_http_ratepool_token.h"
#include "ngx_http_ratepool_store.h"
#include "ngx_http_ratepool_wait.h"


/*
 * The keys of a pool: choosing one with headroom for a request, holding
 * and releasing it, and learning from each answer what the provider said
 * of its org (limits, 429s and their retry-after, spend caps, dead keys)
 * and what the request used.
 */



/* a 403 may concern the key or only the request: the key sits out a while */
#define RATEPOOL_REFUSED_MS        300000
#define RATEPOOL_OVERLOAD_TIER     10       /* ranks it after fallbacks */

/* where a response header teaches something about the key's org */

#define RATEPOOL_LEARN_LIMIT       0
#define RATEPOOL_LEARN_REMAINING   1
#define RATEPOOL_LEARN_RESET       2
#define RATEPOOL_LEARN_RESET_IN    3       /* a duration: OpenAI's */
#define RATEPOOL_LEARN_NOTHING     4       /* hidden, not learned */

/* token limits: one for input and output, or one for each */
#define RATEPOOL_LEARN_COMBINED    1
#define RATEPOOL_LEARN_SEPARATE    2


typedef struct {
    ngx_str_t                       name;
    size_t                          offset;     /* of the learned set */
    ngx_uint_t                      field;
    ngx_uint_t                      limits;     /* of orgs that have */
} ngx_http_ratepool_learn_header_t;


#define ratepool_learned(f)  offsetof(ngx_http_ratepool_org_sh_t, f)

static ngx_http_ratepool_learn_header_t  ngx_http_ratepool_learn_headers[] = {

    { ngx_string("anthropic-ratelimit-requests-limit"),
      ratepool_learned(requests), RATEPOOL_LEARN_LIMIT, 0 },
    { ngx_string("anthropic-ratelimit-requests-remaining"),
      ratepool_learned(requests), RATEPOOL_LEARN_REMAINING, 0 },
    { ngx_string("anthropic-ratelimit-requests-reset"),
      ratepool_learned(requests), RATEPOOL_LEARN_RESET, 0 },
    { ngx_string("anthropic-ratelimit-tokens-limit"),
      0, RATEPOOL_LEARN_NOTHING, 0 },
    { ngx_string("anthropic-ratelimit-tokens-remaining"),
      0, RATEPOOL_LEARN_NOTHING, 0 },
    { ngx_string("anthropic-ratelimit-tokens-reset"),
      0, RATEPOOL_LEARN_NOTHING, 0 },
    { ngx_string("anthropic-ratelimit-input-tokens-limit"),
      ratepool_learned(input_tokens), RATEPOOL_LEARN_LIMIT,
      RATEPOOL_LEARN_SEPARATE },
    { ngx_string("anthropic-ratelimit-input-tokens-remaining"),
      ratepool_learned(input_tokens), RATEPOOL_LEARN_REMAINING,
      RATEPOOL_LEARN_SEPARATE },
    { ngx_string("anthropic-ratelimit-input-tokens-reset"),
      ratepool_learned(input_tokens), RATEPOOL_LEARN_RESET,
      RATEPOOL_LEARN_SEPARATE },
    { ngx_string("anthropic-ratelimit-output-tokens-limit"),
      ratepool_learned(output_tokens), RATEPOOL_LEARN_LIMIT,
      RATEPOOL_LEARN_SEPARATE },
    { ngx_string("anthropic-ratelimit-output-tokens-remaining"),
      ratepool_learned(output_tokens), RATEPOOL_LEARN_REMAINING,
      RATEPOOL_LEARN_SEPARATE },
    { ngx_string("anthropic-ratelimit-output-tokens-reset"),
      ratepool_learned(output_tokens), RATEPOOL_LEARN_RESET,
      RATEPOOL_LEARN_SEPARATE },
    { ngx_string("x-ratelimit-limit-requests"),
      ratepool_learned(requests), RATEPOOL_LEARN_LIMIT, 0 },
    { ngx_string("x-ratelimit-remaining-requests"),
      ratepool_learned(requests), RATEPOOL_LEARN_REMAINING, 0 },
    { ngx_string("x-ratelimit-reset-requests"),
      ratepool_learned(requests), RATEPOOL_LEARN_RESET_IN, 0 },

    /* one limit for input and output, kept where ITPM is: see "combined" */
    { ngx_string("x-ratelimit-limit-tokens"),
      ratepool_learned(input_tokens), RATEPOOL_LEARN_LIMIT,
      RATEPOOL_LEARN_COMBINED },
    { ngx_string("x-ratelimit-remaining-tokens"),
      ratepool_learned(input_tokens), RATEPOOL_LEARN_REMAINING,
      RATEPOOL_LEARN_COMBINED },
    { ngx_string("x-ratelimit-reset-tokens"),
      ratepool_learned(input_tokens), RATEPOOL_LEARN_RESET_IN,
      RATEPOOL_LEARN_COMBINED },
    { ngx_string("x-ratelimit-limit-project-tokens"),
      ratepool_learned(input_tokens), RATEPOOL_LEARN_LIMIT,
      RATEPOOL_LEARN_COMBINED },
    { ngx_string("x-ratelimit-remaining-project-tokens"),
      ratepool_learned(input_tokens), RATEPOOL_LEARN_REMAINING,
      RATEPOOL_LEARN_COMBINED },
    { ngx_string("x-ratelimit-reset-project-tokens"),
      ratepool_learned(input_tokens), RATEPOOL_LEARN_RESET_IN,
      RATEPOOL_LEARN_COMBINED },

    { ngx_null_string, 0, 0, 0 }
};


/* what one response said, collected before the zone is locked */

typedef struct {
    uint64_t                        value[RATEPOOL_DIMS][3];
    unsigned                        seen[RATEPOOL_DIMS][3];
    uint64_t                        retry_after_ms;
    unsigned                        has_retry_after:1;
    unsigned                        retry_after_ms_seen:1;
} ngx_http_ratepool_answer_t;


static void ngx_http_ratepool_overloaded(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_ratepool_key_t *key, uint64_t until_ms);
static void ngx_http_ratepool_candidates(ngx_http_ratepool_ctx_t *ctx,
    uint64_t now_ms, ratepool_candidate_t *c, uint64_t *home_itpm);
static uint64_t ngx_http_ratepool_home_wait(ngx_http_ratepool_ctx_t *ctx,
    uint64_t home_itpm, uint64_t now_ms);
static uint64_t ngx_http_ratepool_input_at(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_ratepool_key_t *key, uint64_t now_ms);
static uint64_t ngx_http_ratepool_prefix_at(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_ratepool_org_sh_t *osh);
static void ngx_http_ratepool_unclaim_locked(ngx_http_ratepool_ctx_t *ctx);
static ngx_uint_t ngx_http_ratepool_count_turn(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_ratepool_tokens_t *used, uint64_t now_ms, ratepool_turn_t *turn,
    uint64_t *ttl_ms);
static void ngx_http_ratepool_answer_set(ngx_http_ratepool_answer_t *a,
    ngx_uint_t set, ngx_uint_t field, uint64_t value);
static void ngx_http_ratepool_read_answer(ngx_http_request_t *r,
    ngx_http_upstream_headers_in_t *h, ngx_uint_t combined,
    ngx_http_ratepool_answer_t *a);


/*
 * With the zone locked: the state of every key as the chooser sees it,
 * for this request's cost in the class of its model.
 */

static void
ngx_http_ratepool_candidates(ngx_http_ratepool_ctx_t *ctx, uint64_t now_ms,
    ratepool_candidate_t *c, uint64_t *home_itpm)
{
    uint64_t                     limit[RATEPOOL_DIMS], cost[RATEPOOL_DIMS],
                                 reserved[RATEPOOL_DIMS], wait_ms, level,
                                 permille;
    ngx_uint_t                   i, b, dialect, same;
    ratepool_bucket_t           *bucket[RATEPOOL_DIMS];
    ngx_http_ratepool_org_t     *org;
    ngx_http_ratepool_key_t     *keys;
    ngx_http_ratepool_org_sh_t  *osh, *bsh;

    keys = ctx->pool->keys->elts;

    cost[RATEPOOL_RPM] = 1;

    /*
     * A request goes to keys of its client's dialect (and a later try to
     * the first try's), if the pool has any: never from one API to the
     * other halfway.
     */

    dialect = ctx->key ? ctx->key->dialect
                       : (ratepool_openai_path(ctx->request->uri.data,
                                               ctx->request->uri.len)
                          ? RATEPOOL_DIALECT_OPENAI
                          : RATEPOOL_DIALECT_ANTHROPIC);
    same = 0;

    for (i = 0; i < ctx->pool->keys->nelts; i++) {
        same |= (keys[i].dialect == dialect);
    }

    for (i = 0; i < ctx->pool->keys->nelts; i++) {
        org = ngx_http_ratepool_ctx_org(ctx, &keys[i]);
        osh = org->sh;

        ngx_http_ratepool_org_buckets(org, bucket, limit);
        ngx_http_ratepool_org_split(org,
                                    ngx_http_ratepool_input_at(ctx, &keys[i],
                                                               now_ms),
                                    ctx->output_cost, cost);

        c[i].home = (ctx->home != NULL
                     && ngx_http_ratepool_key_org(ctx->pool, &keys[i])->sh
                        == ctx->home);

        if (c[i].home && home_itpm) {
            *home_itpm = limit[RATEPOOL_ITPM];
        }

        reserved[RATEPOOL_RPM] = 0;

        if (osh->claim_id && osh->claim_until_ms > now_ms
            && osh->claim_id != ngx_http_ratepool_claim_id(ctx))
        {
            /* what a waiting request holds is as good as reserved */
            ngx_http_ratepool_org_split(org,
                                osh->lim.reserved_input + osh->claim_input,
                                osh->lim.reserved_output + osh->claim_output,
                                reserved);

        } else {
            ngx_http_ratepool_org_split(org, osh->lim.reserved_input,
                                        osh->lim.reserved_output, reserved);
        }

        /* a key whose org spent its money is of no use until it resets */
        c[i].usable = (keys[i].sh->dead_status == 0
                       && ngx_http_ratepool_key_org(ctx->pool, &keys[i])
                              ->sh->spent_until_ms <= now_ms);
        c[i].free_at_ms = ngx_max(osh->cooldown_until_ms,
                                  keys[i].sh->refused_until_ms);
        c[i].cooling = (c[i].free_at_ms > now_ms);
        c[i].fallback = (uint32_t) keys[i].fallback;

        /* an overloaded provider is used after the others, not never */
        if (keys[i].sh->overloaded_until_ms > now_ms) {
            c[i].fallback += RATEPOOL_OVERLOAD_TIER;
        }

        if (same && keys[i].dialect != dialect) {
            c[i].usable = 0;
        }

        /* a cloud takes a request only for a model it is told the name of */
        if (keys[i].provider->service != RATEPOOL_SERVICE_DIRECT
            && (ctx->count_only || !ctx->body_whole || ctx->cloud_model == NULL
                || (keys[i].provider->service == RATEPOOL_SERVICE_VERTEX
                    ? ctx->cloud_model->vertex.len == 0
                    : ctx->cloud_model->bedrock.len == 0)
                || ctx->model_at < 0 || ctx->model_end <= ctx->model_at))
        {
            c[i].usable = 0;
        }

        /* nor a key that has no access token */
        if (keys[i].credential == RATEPOOL_CREDENTIAL_GOOGLE
            && !ngx_http_ratepool_token_valid(&keys[i], ngx_time()))
        {
            c[i].usable = 0;
        }

        c[i].org_inflight = (uint32_t) osh->inflight;
        bsh = ngx_http_ratepool_key_org(ctx->pool, &keys[i])->sh;
        c[i].org_homes = (uint32_t) (bsh->homes + bsh->arriving);
        c[i].key_inflight = (uint32_t) keys[i].sh->inflight;
        c[i].last_pick_ms = keys[i].sh->last_pick_ms;

        if (ctx->count_only) {
            /* counted apart: the org's messages limits are not its own */
            c[i].free_at_ms = keys[i].sh->refused_until_ms;
            c[i].cooling = (c[i].free_at_ms > now_ms);
            c[i].headroom_permille = 1000;
            continue;
        }

        if (ngx_http_ratepool_busy(osh, now_ms)) {
            c[i].free_at_ms = ngx_max(c[i].free_at_ms, osh->lim.busy_until_ms);
        }

        /*
         * Free when the request's cost fits every known bucket of the org
         * beside what requests in flight reserved; the headroom is that
         * of the fullest-used bucket.
         */

        c[i].headroom_permille = 1000;

        for (b = 0; b < RATEPOOL_DIMS; b++) {
            if (limit[b] == 0) {
                continue;
            }

            wait_ms = ratepool_bucket_fit_ms(bucket[b], limit[b], cost[b],
                                             reserved[b], now_ms);

            if (wait_ms && now_ms + wait_ms > c[i].free_at_ms) {
                c[i].free_at_ms = now_ms + wait_ms;
            }

            level = ratepool_bucket_free(bucket[b], limit[b], reserved[b],
                                         now_ms);
            permille = level * 1000 / limit[b];

            if (permille < c[i].headroom_permille) {
                c[i].headroom_permille = (uint32_t) permille;
            }
        }

        if (ratepool_dims_zero(limit)) {
            /*
             * Nothing is known of this org until its first answer: it is
             * tried with one request, and ranks last while that runs.
             */
            c[i].headroom_permille = osh->inflight ? 0 : 1000;
        }
    }
}


/*
 * With the zone locked: what a request's input costs the org of a key.
 * Where the request's cache is, what is new since its conversation's
 * last turn; where another turn of its tools and system was answered
 * lately, the rest; anywhere else, all of it.  An org whose limit counts
 * cache reads counts all of it too.
 */

static uint64_t
ngx_http_ratepool_input_at(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_ratepool_key_t *key, uint64_t now_ms)
{
    ngx_http_ratepool_org_t     *org;
    ngx_http_ratepool_org_sh_t  *osh;

    if (ctx->conversation == 0) {
        return ctx->input_cost;
    }

    org = ngx_http_ratepool_ctx_org(ctx, key);

    if (org->cache_reads || org->combined) {
        return ctx->input_full;
    }

    osh = ngx_http_ratepool_key_org(ctx->pool, key)->sh;

    if (osh == ctx->home) {
        return ctx->input_cost;
    }

    if (ctx->input_prefix
        && ngx_http_ratepool_home_find(ctx->pool->zone,
                                       ngx_http_ratepool_prefix_at(ctx, osh),
                                       now_ms))
    {
        return ngx_max(ctx->input_full - ctx->input_prefix, 1);
    }

    return ctx->input_full;
}


/* the key of a request's tools and system as one org's cache holds them */

static uint64_t
ngx_http_ratepool_prefix_at(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_ratepool_org_sh_t *osh)
{
    return ratepool_home_key(ctx->prefix, osh->entry.name,
                             osh->entry.name_len);
}


/*
 * How long a first try may wait for its home to have room: while that
 * costs less than a move would (ratepool_home_move_ms()), and within
 * its ratepool_wait.  A re-send never waits, nor does a request sent to
 * another pool by an error page, which cannot wait.
 */

static uint64_t
ngx_http_ratepool_home_wait(ngx_http_ratepool_ctx_t *ctx, uint64_t home_itpm,
    uint64_t now_ms)
{
    uint64_t                       left_ms;
    ngx_http_ratepool_loc_conf_t  *rlcf;

    if (ctx->round_tries || ctx->redirected) {
        return 0;
    }

    rlcf = ngx_http_get_module_loc_conf(ctx->request,
                                        ngx_http_ratepool_module);

    left_ms = rlcf->wait;

    if (ctx->wait_until_ms) {
        left_ms = ctx->wait_until_ms > now_ms ? ctx->wait_until_ms - now_ms
                                              : 0;
    }

    return ngx_min(left_ms, ratepool_home_move_ms(ctx->input_full,
                                                  ctx->input_cost,
                                                  home_itpm));
}


/*
 * Which class of each org a request's model uses: the first of the org's
 * model patterns that matches, else the org's default limits.
 */

ngx_int_t
ngx_http_ratepool_resolve_classes(ngx_http_ratepool_ctx_t *ctx)
{
    ngx_uint_t                i, n, base;
    ngx_http_ratepool_org_t  *orgs;

    ctx->classes = NULL;

    if (ctx->pool->classes == 0 || ctx->model.len == 0) {
        return NGX_OK;
    }

    orgs = ctx->pool->orgs->elts;
    n = ctx->pool->orgs->nelts;

    ctx->classes = ngx_palloc(ctx->request->pool, n * sizeof(ngx_uint_t));
    if (ctx->classes == NULL) {
        return NGX_ERROR;
    }

    for (i = 0; i < n; i++) {
        ctx->classes[i] = i;
    }

    for (i = 0; i < n; i++) {
        base = orgs[i].base;

        if (orgs[i].model.len && ctx->classes[base] == base
            && ratepool_model_match(orgs[i].model.data, orgs[i].model.len,
                                    ctx->model.data, ctx->model.len))
        {
            ctx->classes[base] = i;
        }
    }

    return NGX_OK;
}


/*
 * Chooses a key for a try and holds it: one request taken from its org's
 * bucket and the request's tokens reserved there, counted in flight until
 * released.  NULL if no key this request
 * has not tried can be used now; *soonest_ms then says when one frees up
 * (0: none ever will, all are dead or tried).
 */

ngx_http_ratepool_key_t *
ngx_http_ratepool_acquire(ngx_http_ratepool_ctx_t *ctx, uint64_t *soonest_ms)
{
    long                        i;
    uint64_t                    now_ms, wait_ms, home_itpm,
                                limits[RATEPOOL_DIMS];
    ngx_uint_t                  n, k;
    ngx_slab_pool_t            *shpool;
    ratepool_bucket_t          *bucket[RATEPOOL_DIMS];
    ngx_http_ratepool_org_t    *org;
    ngx_http_ratepool_key_t    *keys, *key;
    ngx_http_ratepool_org_sh_t *bsh;
    ratepool_candidate_t        c[RATEPOOL_KEYS_MAX];

    keys = ctx->pool->keys->elts;
    n = ctx->pool->keys->nelts;
    shpool = ctx->pool->zone->shpool;
    now_ms = ngx_http_ratepool_now_ms();

    home_itpm = 0;

    ngx_shmtx_lock(&shpool->mutex);

    ngx_http_ratepool_candidates(ctx, now_ms, c, &home_itpm);

    for (k = 0; k < n; k++) {
        if (ctx->tried & ((uint64_t) 1 << k)) {
            c[k].usable = 0;
        }
    }

    if (ctx->home) {
        i = ratepool_pick_home(c, n, now_ms,
                               ngx_http_ratepool_home_wait(ctx, home_itpm,
                                                           now_ms),
                               soonest_ms);

    } else if (ctx->conversation) {
        i = ratepool_pick_new(c, n, now_ms, soonest_ms);

    } else {
        i = ratepool_pick(c, n, now_ms, soonest_ms);
    }

    if (i < 0) {
        ngx_shmtx_unlock(&shpool->mutex);

        ngx_log_debug1(NGX_LOG_DEBUG_HTTP, ctx->request->connection->log, 0,
                       "ratepool: no key has room, the first frees up at "
                       "%uL", *soonest_ms);
        return NULL;
    }

    key = &keys[i];
    org = ngx_http_ratepool_ctx_org(ctx, key);

    ngx_http_ratepool_unclaim_locked(ctx);

    if (!ctx->count_only) {
        ngx_http_ratepool_org_buckets(org, bucket, limits);
        (void) ratepool_bucket_take(bucket[RATEPOOL_RPM], limits[RATEPOOL_RPM],
                                    1, now_ms, &wait_ms);
    }

    ctx->acquired_input = ngx_http_ratepool_input_at(ctx, key, now_ms);
    org->sh->lim.reserved_input += ctx->acquired_input;
    org->sh->lim.reserved_output += ctx->output_cost;
    org->sh->inflight++;
    key->sh->inflight++;
    (void) ngx_atomic_fetch_add(&ctx->pool->zone->sh->in_flight, 1);
    key->sh->last_pick_ms = now_ms;

    bsh = ngx_http_ratepool_key_org(ctx->pool, key)->sh;

    if (ctx->conversation && ctx->home == NULL && ctx->arriving == NULL) {
        /* counted where it will be at home, until it is */
        ctx->arriving = bsh;
        ctx->arriving->arriving++;
    }

    if (ctx->prefix) {
        /* the org will have its tools and system as soon as it answers */
        ngx_http_ratepool_home_prefix(ctx->pool->zone,
                                      ngx_http_ratepool_prefix_at(ctx, bsh),
                                      bsh, RATEPOOL_HOME_PENDING_MS, now_ms);
    }

    ngx_shmtx_unlock(&shpool->mutex);

    ctx->placement = ctx->conversation == 0 ? RATEPOOL_PLACED_NONE
                     : ctx->home == NULL ? RATEPOOL_PLACED_NEW
                     : c[i].home ? RATEPOOL_PLACED_HOME
                     : RATEPOOL_PLACED_MOVED;

    ngx_log_debug4(NGX_LOG_DEBUG_HTTP, ctx->request->connection->log, 0,
                   "ratepool: key \"%V\" of org \"%V\" chosen, headroom "
                   "%uD permille, try %ui", &key->name, &org->entry,
                   c[i].headroom_permille, ctx->tries + 1);

    return key;
}


/*
 * When the first key that is not dead frees up, tried by this request or
 * not: the retry-after of an answer that no key can beat.  Now, if one is
 * free already.
 */

uint64_t
ngx_http_ratepool_soonest(ngx_http_ratepool_ctx_t *ctx)
{
    uint64_t               now_ms, soonest_ms;
    ngx_slab_pool_t       *shpool;
    ratepool_candidate_t   c[RATEPOOL_KEYS_MAX];

    shpool = ctx->pool->zone->shpool;
    now_ms = ngx_http_ratepool_now_ms();

    ngx_shmtx_lock(&shpool->mutex);
    ngx_http_ratepool_candidates(ctx, now_ms, c, NULL);
    ngx_shmtx_unlock(&shpool->mutex);

    if (ratepool_pick(c, ctx->pool->keys->nelts, now_ms, &soonest_ms) >= 0) {
        soonest_ms = now_ms;
    }

    return soonest_ms;
}


/*
 * A waiting request holds what it needs on the org where it fits first:
 * requests that come later fit only beside it, so that a large request
 * is not passed by small ones forever.  One request holds an org at a
 * time: the first to wait for it, then the one whose turn it is
 * (ratepool_wait's fair turns, take_over).  The hold lasts as long as
 * the request may wait, and goes when it has a key or ends.
 */

void
ngx_http_ratepool_claim(ngx_http_ratepool_ctx_t *ctx, uint64_t until_ms,
    ngx_uint_t take_over)
{
    long                         i;
    uint64_t                     now_ms, soonest_ms, tokens[RATEPOOL_DIMS];
    ngx_uint_t                   k, n;
    ngx_slab_pool_t             *shpool;
    ngx_http_ratepool_org_t     *org;
    ngx_http_ratepool_key_t     *keys;
    ngx_http_ratepool_org_sh_t     *osh;
    ngx_http_ratepool_main_conf_t  *rmcf;
    ratepool_candidate_t            c[RATEPOOL_KEYS_MAX];

    if (ctx->home) {
        /* it waits for its home, where its cache is, or moves */
        return;
    }

    keys = ctx->pool->keys->elts;
    n = ctx->pool->keys->nelts;
    shpool = ctx->pool->zone->shpool;
    now_ms = ngx_http_ratepool_now_ms();

    ngx_shmtx_lock(&shpool->mutex);

    ngx_http_ratepool_candidates(ctx, now_ms, c, NULL);

    /* the first to free up, of those that are only short of room */
    i = -1;
    soonest_ms = 0;

    for (k = 0; k < n; k++) {
        if (c[k].usable && !c[k].cooling && c[k].fallback == 0
            && (i < 0 || c[k].free_at_ms < soonest_ms))
        {
            i = (long) k;
            soonest_ms = c[k].free_at_ms;
        }
    }

    if (i < 0) {
        goto done;
    }

    org = ngx_http_ratepool_ctx_org(ctx, &keys[i]);
    osh = org->sh;

    if (osh == ctx->claimed && ctx->claim_id
        && osh->claim_id == ctx->claim_id)
    {
        goto done;
    }

    /*
     * A live hold goes only to a request whose workspace is owed a turn
     * before the holder's (ratepool_wait's fair turns): between equals
     * the holder keeps it, or two large requests would each hold the
     * org against the other.
     */

    if (osh->claim_id && osh->claim_until_ms > now_ms
        && (!take_over || ctx->workspace->sh->turns >= osh->claim_turns))
    {
        goto done;
    }

    /* another waiting request's hold, if any, goes to the one whose turn
       it is now */

    ngx_http_ratepool_unclaim_locked(ctx);

    ngx_http_ratepool_org_split(org,
                                ngx_http_ratepool_input_at(ctx, &keys[i],
                                                           now_ms),
                                ctx->output_cost, tokens);

    if (ctx->claim_id == 0) {
        /* unique across workers: the pid, and this worker's count */
        rmcf = ctx->pool->zone->conf;
        ctx->claim_id = ((uint64_t) ngx_pid << 32) | ++rmcf->claims;
    }

    osh->claim_id = ctx->claim_id;
    osh->claim_turns = ctx->workspace->sh->turns;
    osh->claim_input = tokens[RATEPOOL_ITPM];
    osh->claim_output = tokens[RATEPOOL_OTPM];
    osh->claim_until_ms = until_ms;
    ctx->claimed = osh;

done:

    ngx_shmtx_unlock(&shpool->mutex);
}


void
ngx_http_ratepool_unclaim(ngx_http_ratepool_ctx_t *ctx)
{
    ngx_slab_pool_t  *shpool;

    if (ctx->claimed == NULL) {
        return;
    }

    shpool = ctx->pool->zone->shpool;

    ngx_shmtx_lock(&shpool->mutex);
    ngx_http_ratepool_unclaim_locked(ctx);
    ngx_shmtx_unlock(&shpool->mutex);

    ngx_http_ratepool_wake(ctx->pool);
}


static void
ngx_http_ratepool_unclaim_locked(ngx_http_ratepool_ctx_t *ctx)
{
    ngx_http_ratepool_org_sh_t  *osh;

    osh = ctx->claimed;

    if (osh == NULL) {
        return;
    }

    ctx->claimed = NULL;

    if (ctx->claim_id && osh->claim_id == ctx->claim_id) {
        osh->claim_id = 0;
        osh->claim_input = 0;
        osh->claim_output = 0;
        osh->claim_until_ms = 0;
    }
}


/*
 * Gives back a key held for a try, and the tokens reserved with it: what
 * the try used is charged from its answer.  *key is cleared, so it is
 * given back once.
 */

void
ngx_http_ratepool_release(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_ratepool_key_t **key, ngx_uint_t failed)
{
    uint64_t                  input;
    ngx_slab_pool_t          *shpool;
    ngx_http_ratepool_org_t  *org;
    ngx_http_ratepool_key_t  *k;

    k = *key;

    if (k == NULL) {
        return;
    }

    *key = NULL;

    org = ngx_http_ratepool_ctx_org(ctx, k);
    shpool = ctx->pool->zone->shpool;

    ngx_shmtx_lock(&shpool->mutex);

    k->sh->inflight--;
    org->sh->inflight--;

    if (ctx->arriving == ngx_http_ratepool_key_org(ctx->pool, k)->sh) {
        ctx->arriving->arriving -= ngx_min(ctx->arriving->arriving, 1);
        ctx->arriving = NULL;
    }

    input = (key == &ctx->next) ? ctx->next_input : ctx->held_input;

    org->sh->lim.reserved_input -= ngx_min(input,
                                           org->sh->lim.reserved_input);
    org->sh->lim.reserved_output -= ngx_min(ctx->output_cost,
                                            org->sh->lim.reserved_output);

    if (failed) {
        k->sh->failed++;
    }

    ngx_shmtx_unlock(&shpool->mutex);

    (void) ngx_atomic_fetch_add(&ctx->pool->zone->sh->in_flight,
                                (ngx_atomic_int_t) -1);

    ngx_http_ratepool_wake(ctx->pool);
}


static void
ngx_http_ratepool_read_answer(ngx_http_request_t *r,
    ngx_http_upstream_headers_in_t *h, ngx_uint_t combined,
    ngx_http_ratepool_answer_t *a)
{
    u_char                            *key;
    time_t                             t;
    uint64_t                           ms, value;
    ngx_uint_t                         i, set;
    ngx_list_part_t                   *part;
    ngx_table_elt_t                   *header;
    ngx_http_ratepool_learn_header_t  *lh;

    ngx_memzero(a, sizeof(ngx_http_ratepool_answer_t));

    part = &h->headers.part;
    header = part->elts;

    for (i = 0; /* void */; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            header = part->elts;
            i = 0;
        }

        key = header[i].lowcase_key;

        /* most headers are none of ours: tell by the first letter */
        if (header[i].hash == 0 || header[i].key.len < sizeof("retry-after") - 1
            || (key[0] != 'r' && key[0] != 'a' && key[0] != 'x'))
        {
            continue;
        }

        /* retry-after-ms, which the SDKs read, says it more exactly */

        if (header[i].key.len == sizeof("retry-after-ms") - 1
            && ngx_memcmp(key, "retry-after-ms", sizeof("retry-after-ms") - 1)
               == 0)
        {
            if (ratepool_parse_uint(header[i].value.data,
                                    header[i].value.len, &ms)
                == 0)
            {
                a->retry_after_ms = ms;
                a->has_retry_after = 1;
                a->retry_after_ms_seen = 1;
            }

            continue;
        }

        if (header[i].key.len == sizeof("retry-after") - 1
            && ngx_memcmp(key, "retry-after", sizeof("retry-after") - 1) == 0
            && !a->retry_after_ms_seen)
        {
            if (ratepool_parse_retry_after(header[i].value.data,
                                           header[i].value.len, ngx_time(),
                                           &a->retry_after_ms)
                == 0)
            {
                a->has_retry_after = 1;

            } else {
                ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                              "ratepool: ignored invalid retry-after \"%V\"",
                              &header[i].value);
            }

            continue;
        }

        for (lh = ngx_http_ratepool_learn_headers; lh->name.len; lh++) {

            if (lh->name.len != header[i].key.len
                || ngx_memcmp(lh->name.data, key, lh->name.len) != 0)
            {
                continue;
            }

            if (lh->field == RATEPOOL_LEARN_NOTHING
                || (lh->limits
                    && lh->limits != (combined ? RATEPOOL_LEARN_COMBINED
                                               : RATEPOOL_LEARN_SEPARATE)))
            {
                /* not a limit this org's buckets know */
                break;
            }

            set = (lh->offset - ratepool_learned(requests))
                  / sizeof(ngx_http_ratepool_learned_t);

            if (lh->field == RATEPOOL_LEARN_RESET) {
                if (ratepool_parse_rfc3339(header[i].value.data,
                                           header[i].value.len, &t) == 0)
                {
                    ngx_http_ratepool_answer_set(a, set, lh->field,
                                                 (uint64_t) t);
                }

            } else if (lh->field == RATEPOOL_LEARN_RESET_IN) {
                if (ratepool_parse_duration_ms(header[i].value.data,
                                               header[i].value.len, &ms)
                    == 0)
                {
                    /* "6m0s" from now, rounded up to whole seconds */
                    ngx_http_ratepool_answer_set(a, set,
                                    RATEPOOL_LEARN_RESET,
                                    (uint64_t) ngx_time() + (ms + 999) / 1000);
                }

            } else if (ratepool_parse_uint(header[i].value.data,
                                           header[i].value.len, &value)
                       == 0)
            {
                ngx_http_ratepool_answer_set(a, set, lh->field, value);
            }

            break;
        }
    }
}


/*
 * Where two headers speak of one limit (an OpenAI project's tokens beside
 * its org's), the tighter one counts: the lower limit and remainder, the
 * later reset.
 */

static void
ngx_http_ratepool_answer_set(ngx_http_ratepool_answer_t *a, ngx_uint_t set,
    ngx_uint_t field, uint64_t value)
{
    a->value[set][field] = ratepool_tighter(field == RATEPOOL_LEARN_RESET,
                                            a->seen[set][field],
                                            a->value[set][field], value);
    a->seen[set][field] = 1;
}


/*
 * Every answer updates what the gateway knows of the key and its org:
 * learned limits, cooldowns after a 429, dead keys after 401 and 403.
 */

void
ngx_http_ratepool_learn(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_upstream_headers_in_t *h)
{
    ngx_tm_t                      tm;
    int64_t                       remaining[RATEPOOL_DIMS];
    uint64_t                      now_ms, floor_ms, limit, cooldown_ms,
                                  demoted_ms, sent_ms, left,
                                  limits[RATEPOOL_DIMS], seen[RATEPOOL_DIMS],
                                  cost[RATEPOOL_DIMS];
    ngx_uint_t                    status, set, shared;
    ratepool_bucket_t            *bucket[RATEPOOL_DIMS];
    ngx_slab_pool_t              *shpool;
    ngx_http_request_t           *r;
    ngx_http_ratepool_org_t      *org;
    ngx_http_ratepool_key_t      *key;
    ngx_http_ratepool_org_sh_t   *osh, *bsh;
    ngx_http_ratepool_key_sh_t   *ksh;
    ngx_http_ratepool_learned_t  *learned;
    ngx_http_ratepool_answer_t    a;
    const ngx_http_ratepool_store_t  *store;

    r = ctx->request;
    key = ctx->key;
    org = ngx_http_ratepool_ctx_org(ctx, key);
    osh = org->sh;
    ksh = key->sh;
    status = h->status_n;

    ngx_http_ratepool_read_answer(r, h, org->combined, &a);

    now_ms = ngx_http_ratepool_now_ms();
    floor_ms = 0;
    demoted_ms = 0;
    shpool = ctx->pool->zone->shpool;

    ngx_shmtx_lock(&shpool->mutex);

    shared = 0;

    /* a count_tokens answer speaks of limits that are not the org's */

    for (set = 0; set < RATEPOOL_DIMS && !ctx->count_only; set++) {
        learned = &osh->requests + set;
        seen[set] = 0;

        if (a.seen[set][RATEPOOL_LEARN_LIMIT]) {
            if (learned->limit != a.value[set][RATEPOOL_LEARN_LIMIT]) {
                /* a limit new to this gateway is news to the others */
                seen[set] = a.value[set][RATEPOOL_LEARN_LIMIT];
                shared = 1;
            }

            learned->limit = a.value[set][RATEPOOL_LEARN_LIMIT];
        }

        if (a.seen[set][RATEPOOL_LEARN_REMAINING]) {
            learned->remaining = a.value[set][RATEPOOL_LEARN_REMAINING];
        }

        if (a.seen[set][RATEPOOL_LEARN_RESET]) {
            learned->reset = (time_t) a.value[set][RATEPOOL_LEARN_RESET];
        }
    }

    ngx_http_ratepool_org_buckets(org, bucket, limits);
    ngx_http_ratepool_org_split(org, ctx->held_input, ctx->output_cost, cost);
    limit = limits[RATEPOOL_RPM];

    /* when this try went out (nginx's clock, as the zone's) */
    sent_ms = ngx_min((uint64_t) r->upstream->start_time, now_ms);

    /*
     * What the provider has left counts this request's input already,
     * while the bucket is charged for it only once the answer says how
     * much it was: until then, its estimate is left out of both.
     */

    for (set = 0; set < RATEPOOL_DIMS; set++) {
        remaining[set] = -1;

        if (limits[set] == 0 || !a.seen[set][RATEPOOL_LEARN_REMAINING]
            || ctx->count_only)
        {
            continue;
        }

        ratepool_bucket_clamp(bucket[set], limits[set],
                              a.value[set][RATEPOOL_LEARN_REMAINING]
                              + (set == RATEPOOL_ITPM ? cost[RATEPOOL_ITPM]
                                                      : 0),
                              now_ms);

        /*
         * Redis counts what every gateway sent; the provider's count
         * matters to it where it is below Redis's by more than 0.3 s of
         * refill, as when others use the org too, or when Redis missed
         * what the provider counted before the limit was known: gateways
         * that trust a Redis more generous than the provider send at
         * once what only one of them may.  The provider counted as the
         * request arrived: what has refilled since is added.
         */

        left = a.value[set][RATEPOOL_LEARN_REMAINING]
               + (uint64_t) (now_ms - sent_ms) * limits[set] / 60000;
        left = ngx_min(left, limits[set]);

        if (ratepool_bucket_level(&osh->lim.shared_left[set], limits[set],
                                  now_ms)
            > left + limits[set] / 200)
        {
            remaining[set] = (int64_t) left;
            shared = 1;
        }
    }

    if (status >= 200 && status < 300) {
        ksh->status_2xx++;
        osh->backoff_level = 0;

    } else if (status == NGX_HTTP_TOO_MANY_REQUESTS
               && (ctx->spent || ctx->too_large || ctx->count_only))
    {
        /* the org is not busy with messages: no cooldown */
        ksh->status_429++;
        ngx_http_ratepool_history_count(ctx->pool->zone->sh,
                                        RATEPOOL_HISTORY_UPSTREAM_429);

    } else if (status == NGX_HTTP_TOO_MANY_REQUESTS) {
        ksh->status_429++;
        ngx_http_ratepool_history_count(ctx->pool->zone->sh,
                                        RATEPOOL_HISTORY_UPSTREAM_429);

        if (a.has_retry_after) {
            /* an hour at most: cooldowns survive reloads, typos should not */
            floor_ms = ngx_min(a.retry_after_ms, RATEPOOL_COOLDOWN_MAX_MS);

        } else {
            floor_ms = ratepool_backoff_ms(osh->backoff_level);

            if (osh->backoff_level < 16) {
                osh->backoff_level++;
            }
        }

        osh->cooldown_until_ms = ratepool_cooldown_until(
                                            osh->cooldown_until_ms, now_ms,
                                            floor_ms, (uint32_t) ngx_random());

        /* the provider has nothing left for this org until then */
        if (limit) {
            ratepool_bucket_clamp(&osh->lim.bucket[RATEPOOL_RPM], limit, 0,
                                  now_ms);
        }

    } else if (status == 529 || status == NGX_HTTP_SERVICE_UNAVAILABLE) {
        /*
         * The provider is overloaded, not the key: no org cools down, but
         * the provider's server is given a moment before it is sent
         * another request, so that one may go to another provider.
         */
        if (status == 529) {
            ksh->status_529++;

        } else {
            ksh->status_other++;
        }

        ctx->overloaded = 1;

        if (ctx->pool->overload) {
            demoted_ms = ngx_max(ctx->pool->overload,
                                 a.has_retry_after
                                 ? ngx_min(a.retry_after_ms, 60000) : 0);
        }

        ngx_http_ratepool_overloaded(ctx, key, now_ms + demoted_ms);

    } else if (status == NGX_HTTP_UNAUTHORIZED) {
        ksh->status_401++;

        if (ksh->dead_status == 0) {
            ksh->dead_since = ngx_time();
        }

        ksh->dead_status = status;

    } else if (status == NGX_HTTP_FORBIDDEN) {
        ksh->status_403++;
        ksh->refused_until_ms = ngx_max(ksh->refused_until_ms,
                                        now_ms + RATEPOOL_REFUSED_MS);

    } else {
        ksh->status_other++;
    }

    if (ctx->spent) {
        /*
         * A spend cap or a quota: the org's money is spent until its
         * billing month turns, whatever the status said; its keys are
         * taken out of rotation until then (or until a reload).
         */
        bsh = ngx_http_ratepool_key_org(ctx->pool, key)->sh;
        bsh->spent_until = ratepool_budget_reset(RATEPOOL_BUDGET_MONTH,
                                                 ngx_time());
        bsh->spent_until_ms = now_ms
                              + (uint64_t) (bsh->spent_until - ngx_time())
                                * 1000;
    }

    cooldown_ms = osh->cooldown_until_ms > now_ms
                  ? osh->cooldown_until_ms - now_ms : 0;

    ngx_shmtx_unlock(&shpool->mutex);

    /* other gateways learn it too */

    store = ctx->pool->zone->store;

    if (shared) {
        store->learn(ctx, org, seen, limits, remaining);
    }

    if (ctx->spent) {
        /*
         * Other gateways see a spent org as cooling down, for an hour at
         * a time, so that they do not each pay a request to learn.
         */
        store->cool(ctx, ngx_http_ratepool_key_org(ctx->pool, key),
                    RATEPOOL_COOLDOWN_MAX_MS);

    } else if (status == NGX_HTTP_TOO_MANY_REQUESTS && !ctx->too_large
               && !ctx->count_only)
    {
        store->cool(ctx, org, cooldown_ms);
    }

    if (ctx->spent) {
        ngx_gmtime(ngx_http_ratepool_key_org(ctx->pool, key)->sh->spent_until,
                   &tm);
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "ratepool: key \"%V\" got %ui saying its org's money "
                      "is spent (a spend cap, a quota or no credit): org "
                      "\"%V\" is out of rotation until "
                      "%4d-%02d-%02dT%02d:%02d:%02dZ or a reload",
                      &key->name, status, &org->name, tm.ngx_tm_year,
                      tm.ngx_tm_mon, tm.ngx_tm_mday, tm.ngx_tm_hour,
                      tm.ngx_tm_min, tm.ngx_tm_sec);

    } else if (ctx->too_large) {
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "ratepool: key \"%V\" got 429 for a request larger "
                      "than org \"%V\"'s limit, passed to the client "
                      "without a cooldown", &key->name, &org->name);

    } else if (ctx->overloaded) {
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "ratepool: key \"%V\" got %ui, server \"%V\" is "
                      "overloaded and ranks after the others for %uL ms",
                      &key->name, status, &key->server, demoted_ms);

    } else if (status == NGX_HTTP_TOO_MANY_REQUESTS && ctx->count_only) {
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "ratepool: key \"%V\" got 429 counting tokens, "
                      "which org \"%V\"'s messages do not share",
                      &key->name, &org->name);

    } else if (status == NGX_HTTP_TOO_MANY_REQUESTS) {
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "ratepool: key \"%V\" got 429, org \"%V\" cools down "
                      "for at least %uL ms", &key->name, &org->name,
                      floor_ms);

    } else if (status == NGX_HTTP_FORBIDDEN) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "ratepool: key \"%V\" (sha256 %*s) was refused with "
                      "403, out of rotation for %d s",
                      &key->name, (size_t) RATEPOOL_FINGERPRINT_LEN,
                      key->fingerprint, RATEPOOL_REFUSED_MS / 1000);

    } else if (status == NGX_HTTP_UNAUTHORIZED) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "ratepool: key \"%V\" (sha256 %*s) was refused with "
                      "%ui, taken out of rotation until nginx is reloaded",
                      &key->name, (size_t) RATEPOOL_FINGERPRINT_LEN,
                      key->fingerprint, status);
    }
}


/*
 * Charges what a try used: a request that asked a model for something
 * and did not learn from its answer all it used (one cut short, or that
 * could not be read, or a request sent and never answered: the provider
 * had it all the same) is charged an estimate of the rest.
 */

void
ngx_http_ratepool_charge(ngx_http_ratepool_ctx_t *ctx,
    ratepool_usage_t *usage, int answer, int sse)
{
    ratepool_usage_guess_t  guess;

    if (ctx->model.len && !ctx->count_only) {
        guess.input = ctx->held_input;
        guess.input_full = ngx_max(ctx->input_full, ctx->held_input);
        guess.output = ctx->output_cost;

        if (ratepool_usage_estimate(usage, &guess, answer, sse,
                                    ctx->answer_whole))
        {
            ngx_log_error(NGX_LOG_INFO, ctx->request->connection->log, 0,
                          "ratepool: %s from key \"%V\" did not say all it "
                          "used: charged %uL input and %uL output tokens, "
                          "some of them estimated",
                          answer == RATEPOOL_USAGE_UNANSWERED
                          ? "no answer" : "an answer", &ctx->key->name,
                          usage->input_tokens + usage->cache_read_input_tokens
                          + usage->cache_creation_input_tokens,
                          usage->output_tokens);
        }
    }

    ngx_http_ratepool_count_usage(ctx, usage);
}


/* the list prices of the request's model: the first pattern it matches */

ngx_http_ratepool_price_t *
ngx_http_ratepool_price_of(ngx_http_ratepool_ctx_t *ctx)
{
    ngx_uint_t                      i;
    ngx_http_ratepool_price_t      *prices;
    ngx_http_ratepool_main_conf_t  *rmcf;

    if (ctx->price_found) {
        return ctx->price;
    }

    ctx->price_found = 1;
    ctx->price = NULL;

    rmcf = ctx->pool->zone->conf;
    prices = rmcf->prices.elts;

    for (i = 0; i < rmcf->prices.nelts && ctx->model.len; i++) {
        if (ratepool_model_match(prices[i].pattern.data, prices[i].pattern.len,
                                 ctx->model.data, ctx->model.len))
        {
            ctx->price = &prices[i];
            break;
        }
    }

    return ctx->price;
}


/* adds one answer's usage to its key, org, workspace and client */

void
ngx_http_ratepool_count_usage(ngx_http_ratepool_ctx_t *ctx,
    ratepool_usage_t *usage)
{
    time_t                          now;
    uint64_t                        total, now_ms, ttl_ms,
                                    limits[RATEPOOL_DIMS],
                                    tokens[RATEPOOL_DIMS];
    ngx_uint_t                      i, homed;
    ratepool_turn_t                 turn;
    ngx_slab_pool_t                *shpool;
    ratepool_bucket_t              *bucket[RATEPOOL_DIMS];
    ngx_http_ratepool_org_t        *org;
    uint64_t                        counted;
    uint64_t                        cost;
    ngx_http_ratepool_tokens_t     *used[4], add;
    ngx_http_ratepool_price_t      *price;
    ngx_http_ratepool_spend_sh_t   *spend;
    ngx_http_ratepool_workspace_t  *ws;

    if (usage->seen == 0) {
        return;
    }

    if (ratepool_usage_clamp(usage)) {
        ngx_log_error(NGX_LOG_WARN, ctx->request->connection->log, 0,
                      "ratepool: key \"%V\" answered a usage of more than "
                      "%d tokens of one kind, counted as that many",
                      &ctx->key->name, RATEPOOL_USAGE_TOKENS_MAX);
    }

    ratepool_usage_normalize(usage);

    now = ngx_time();

    add.input = usage->input_tokens;
    add.output = usage->output_tokens;
    add.cache_read = usage->cache_read_input_tokens;
    add.cache_creation = usage->cache_creation_input_tokens;

    org = ngx_http_ratepool_ctx_org(ctx, ctx->key);

    used[0] = &ctx->key->sh->used;
    used[1] = &org->sh->used;
    used[2] = ctx->workspace ? &ctx->workspace->sh->used : NULL;
    used[3] = ctx->client ? &ctx->client->sh->used : NULL;

    shpool = ctx->pool->zone->shpool;

    ngx_shmtx_lock(&shpool->mutex);

    if (usage->seen & RATEPOOL_USAGE_ESTIMATED) {
        ctx->key->sh->estimated++;
    }

    for (i = 0; i < 4 && used[i]; i++) {
        used[i]->input += add.input;
        used[i]->output += add.output;
        used[i]->cache_read += add.cache_read;
        used[i]->cache_creation += add.cache_creation;
    }

    /* money, at the list prices of the request's model */
    price = ngx_http_ratepool_price_of(ctx);
    cost = 0;

    if (price) {
        cost = ratepool_price_cost(&price->price, add.input, add.output,
                                   add.cache_creation, add.cache_read);

        ctx->key->sh->cost += cost;
        org->sh->cost += cost;

        if (ctx->client) {
            ctx->client->sh->cost += cost;
        }

        if (ctx->workspace) {
            ws = ctx->workspace;
            spend = ws->spend[price->index];

            spend->used.input += add.input;
            spend->used.output += add.output;
            spend->used.cache_read += add.cache_read;
            spend->used.cache_creation += add.cache_creation;
            spend->cost += cost;

            ws->sh->cost += cost;
            ratepool_budget_add(&ws->sh->cost_today, RATEPOOL_BUDGET_DAY,
                                now, cost);
            ratepool_budget_add(&ws->sh->cost_this_month,
                                RATEPOOL_BUDGET_MONTH, now, cost);
        }
    }

    /*
     * Input tokens per minute count what was written to the cache but not
     * what was read from it, as the provider counts them for most models;
     * an org class may say its model counts them.
     */

    counted = add.input + add.cache_creation
              + (org->cache_reads ? add.cache_read : 0);

    now_ms = ngx_http_ratepool_now_ms();
    ngx_http_ratepool_org_buckets(org, bucket, limits);

    ngx_http_ratepool_org_split(org, counted, add.output, tokens);

    ratepool_bucket_debit(bucket[RATEPOOL_ITPM], limits[RATEPOOL_ITPM],
                          tokens[RATEPOOL_ITPM], now_ms);
    ratepool_bucket_debit(bucket[RATEPOOL_OTPM], limits[RATEPOOL_OTPM],
                          tokens[RATEPOOL_OTPM], now_ms);

    homed = (ctx->conversation && (usage->seen & RATEPOOL_USAGE_INPUT)
             && ngx_http_ratepool_count_turn(ctx, &add, now_ms, &turn,
                                             &ttl_ms));

    if (ctx->workspace) {
        ws = ctx->workspace;

        ratepool_bucket_debit(&ws->sh->lim.bucket[RATEPOOL_ITPM], ws->itpm,
                              counted, now_ms);

        if ((usage->seen & RATEPOOL_USAGE_INPUT) && ctx->conversation) {
            ws->sh->prompt_rate = ratepool_estimate_learn(ws->sh->prompt_rate,
                                            ctx->body_bytes,
                                            add.input + add.cache_read
                                            + add.cache_creation);

        } else if (usage->seen & RATEPOOL_USAGE_INPUT) {
            ws->sh->input_rate = ratepool_estimate_learn(ws->sh->input_rate,
                                                         ctx->body_bytes,
                                                         counted);
        }

        ratepool_bucket_debit(&ws->sh->lim.bucket[RATEPOOL_OTPM], ws->otpm,
                              add.output, now_ms);

        /* an answer cut short says little of what answers produce */
        if ((usage->seen & RATEPOOL_USAGE_OUTPUT) && ctx->output_cap
            && ctx->answer_whole)
        {
            ws->sh->output_avg = ratepool_estimate_output_learn(
                                          ws->sh->output_avg, add.output);
        }

        /* budgets count every token billed, cached or not */
        total = add.input + add.output + add.cache_read + add.cache_creation;

        ratepool_budget_add(&ctx->workspace->sh->today, RATEPOOL_BUDGET_DAY,
                            now, total);
        ratepool_budget_add(&ctx->workspace->sh->this_month,
                            RATEPOOL_BUDGET_MONTH, now, total);
    }

    ngx_shmtx_unlock(&shpool->mutex);

    total = add.input + add.output + add.cache_read + add.cache_creation;
    ctx->pool->zone->store->usage(ctx, counted, add.output, total, cost);

    if (homed) {
        ctx->pool->zone->store->homed(ctx,
                                 ngx_http_ratepool_key_org(ctx->pool,
                                                           ctx->key),
                                 ttl_ms, &turn);
    }
}


/*
 * With the zone locked: the org that answered a turn holds its
 * conversation's cache now, up to what the provider read or wrote of it,
 * until the cache's TTL; a conversation that moved has a new home.  A
 * conversation's first turn tells what its tools and system come to, as
 * the org's cache held them.
 */

static ngx_uint_t
ngx_http_ratepool_count_turn(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_ratepool_tokens_t *used, uint64_t now_ms, ratepool_turn_t *turn,
    uint64_t *ttl_ms)
{
    ngx_http_ratepool_org_sh_t  *osh;

    osh = ngx_http_ratepool_key_org(ctx->pool, ctx->key)->sh;
    *ttl_ms = ctx->cache_long ? RATEPOOL_HOME_TTL_LONG_MS
                              : RATEPOOL_HOME_TTL_MS;

    turn->bytes = ctx->body_bytes;
    turn->total = used->input + used->cache_read + used->cache_creation;
    turn->cached = used->cache_read + used->cache_creation;

    if (turn->bytes == 0 || turn->total == 0) {
        return 0;
    }

    ctx->pool->zone->sh->turns[ctx->placement]++;

    ngx_http_ratepool_home_set(ctx->pool->zone, ctx->conversation, osh,
                               *ttl_ms, turn, now_ms);

    if (ctx->prefix && turn->cached) {
        /* every turn that read or wrote a cache keeps its prefix warm */
        ngx_http_ratepool_home_prefix(ctx->pool->zone,
                                      ngx_http_ratepool_prefix_at(ctx, osh),
                                      osh, *ttl_ms, now_ms);
    }

    return 1;
}


/*
 * Whether every key of the pool that is not dead has spent its org's
 * money; *until is when the first of them resets.
 */

ngx_uint_t
ngx_http_ratepool_pool_spent(ngx_http_ratepool_pool_t *pool, time_t *until)
{
    uint64_t                 now_ms;
    ngx_uint_t               i, spent;
    ngx_http_ratepool_org_t *org;
    ngx_http_ratepool_key_t *keys;

    keys = pool->keys->elts;
    now_ms = ngx_http_ratepool_now_ms();
    spent = 0;
    *until = 0;

    for (i = 0; i < pool->keys->nelts; i++) {
        if (keys[i].sh->dead_status) {
            continue;
        }

        org = ngx_http_ratepool_key_org(pool, &keys[i]);

        if (org->sh->spent_until_ms <= now_ms) {
            return 0;
        }

        if (*until == 0 || org->sh->spent_until < *until) {
            *until = org->sh->spent_until;
        }

        spent = 1;
    }

    return spent;
}


/*
 * With the zone locked: every key on the server of one that answered 529
 * (or 503) ranks after the keys of other servers until then, and this
 * request is not sent there again: another provider may take it.  No
 * key or org cools down; a provider with no other is still used.
 */

static void
ngx_http_ratepool_overloaded(ngx_http_ratepool_ctx_t *ctx,
    ngx_http_ratepool_key_t *key, uint64_t until_ms)
{
    ngx_uint_t                i;
    ngx_http_ratepool_key_t  *keys;

    keys = ctx->pool->keys->elts;

    for (i = 0; i < ctx->pool->keys->nelts; i++) {
        if (keys[i].server.len == key->server.len
            && ngx_strncmp(keys[i].server.data, key->server.data,
                           key->server.len) == 0)
        {
            keys[i].sh->overloaded_until_ms =
                       ngx_max(keys[i].sh->overloaded_until_ms, until_ms);
            ctx->tried |= (uint64_t) 1 << i;
        }
    }
}


/*
 * The rate-limit headers the gateway reads: one org's numbers would
 * mislead a client about the whole pool, so ratepool_pass hides them all.
 */

ngx_str_t *
ngx_http_ratepool_learned_header(ngx_uint_t i)
{
    if (i >= sizeof(ngx_http_ratepool_learn_headers)
             / sizeof(ngx_http_ratepool_learn_header_t) - 1)
    {
        return NULL;
    }

    return &ngx_http_ratepool_learn_headers[i].name;
}

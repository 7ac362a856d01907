
/*
 * Copyright (C) ratepool authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool.h"
#include "ngx_http_ratepool_access.h"
#include "ngx_http_ratepool_admission.h"
#include "ngx_http_ratepool_balancer.h"
#include "ngx_http_ratepool_cloud.h"
#include "ngx_http_ratepool_pool.h"
#include "ngx_http_ratepool_shm.h"
#include "ngx_http_ratepool_store.h"


/*
 * The upstream balancer of a pool: each try goes to the key admission
 * chose or, after a 429 or a failure, to the next one, with the request
 * rebuilt so that the new key's credentials and Host go out with the
 * same body.  The answer's headers are read here, before the filters.
 */


static ngx_int_t ngx_http_ratepool_init_upstream(ngx_conf_t *cf,
    ngx_http_upstream_srv_conf_t *us);
static ngx_int_t ngx_http_ratepool_init_peer(ngx_http_request_t *r,
    ngx_http_upstream_srv_conf_t *us);
static ngx_int_t ngx_http_ratepool_get_peer(ngx_peer_connection_t *pc,
    void *data);
static void ngx_http_ratepool_free_peer(ngx_peer_connection_t *pc,
    void *data, ngx_uint_t state);
static ngx_int_t ngx_http_ratepool_process_header(ngx_http_request_t *r);
static ngx_int_t ngx_http_ratepool_reinit_request(ngx_http_request_t *r);
static ngx_int_t ngx_http_ratepool_requeue_sent(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx);

#if (NGX_HTTP_SSL)
static ngx_int_t ngx_http_ratepool_set_session(ngx_peer_connection_t *pc,
    void *data);
static void ngx_http_ratepool_save_session(ngx_peer_connection_t *pc,
    void *data);
#endif


/*
 * The first key is chosen in the access phase, because the proxy module
 * builds the request (with that key's headers) before it asks for a
 * peer.  A later try uses the key held for it when the answer came, or
 * chooses one now, and rebuilds the request under that key's headers.
 */

static ngx_int_t
ngx_http_ratepool_get_peer(ngx_peer_connection_t *pc, void *data)
{
    ngx_http_ratepool_ctx_t    *ctx = data;

    uint64_t                    soonest_ms;
    ngx_addr_t                 *addr;
    ngx_uint_t                  index;
    ngx_http_request_t         *r;
    ngx_http_upstream_state_t  *state;
    ngx_http_ratepool_key_t    *key;

    r = ctx->request;

    /*
     * The try before was logged with the 429 that moved it on: its
     * $upstream_status is made what the provider sent (nginx has pushed
     * this try's state already).
     */
    if (ctx->moved_status && r->upstream_states
        && r->upstream_states->nelts >= 2)
    {
        state = r->upstream_states->elts;
        state[r->upstream_states->nelts - 2].status = ctx->moved_status;
    }

    ctx->moved_status = 0;

    if (ctx->retry_same) {
        /* the same key again, on a fresh connection */
        ctx->retry_same = 0;

    } else if (ctx->round_tries > 0) {

        key = ctx->next;
        ctx->next = NULL;
        ctx->held_input = ctx->next_input;

        if (key == NULL) {
            key = ngx_http_ratepool_acquire(ctx, &soonest_ms);
            ctx->held_input = ctx->acquired_input;
        }

        if (key == NULL) {
            ngx_log_error(NGX_LOG_WARN, pc->log, 0,
                          "ratepool: no key of pool \"%V\" is left to "
                          "retry with", &ctx->pool->upstream->host);
            pc->tries = 0;
            return NGX_BUSY;
        }

        ctx->key = key;
        ctx->held = key;

        ctx->pool->zone->store->move(ctx);

        /* the same request, under the new key's headers (and service) */
        if (ngx_http_ratepool_build_request(r, ctx) != NGX_OK) {
            return NGX_ERROR;
        }

    } else if (ctx->key->provider->service != RATEPOOL_SERVICE_DIRECT
               || ctx->body_length != -1)
    {
        /*
         * The proxy module built the client's request (a round's first
         * try, after a wait too): this key's own, and with the client's
         * length, which a try to a cloud may have changed.
         */
        if (ngx_http_ratepool_build_request(r, ctx) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    key = ctx->key;
    index = key - (ngx_http_ratepool_key_t *) ctx->pool->keys->elts;

    /* counted here, not when chosen: a request may end before it is sent */
    ngx_shmtx_lock(&ctx->pool->zone->shpool->mutex);
    key->sh->sent++;
    ngx_shmtx_unlock(&ctx->pool->zone->shpool->mutex);

    ctx->tries++;
    ctx->round_tries++;
    ctx->tried |= (uint64_t) 1 << index;
    ctx->answered = 0;
    ctx->exhausted = 0;
    ctx->refused = 0;
    ctx->spent = 0;
    ctx->overloaded = 0;
    ctx->too_large = 0;

    addr = &key->addrs[(ctx->tries - 1) % key->naddrs];

    pc->sockaddr = addr->sockaddr;
    pc->socklen = addr->socklen;
    pc->name = &addr->name;

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, pc->log, 0,
                   "ratepool: try %ui with key \"%V\"", ctx->tries,
                   &key->name);

    return NGX_OK;
}


static void
ngx_http_ratepool_free_peer(ngx_peer_connection_t *pc, void *data,
    ngx_uint_t state)
{
    ngx_http_ratepool_ctx_t  *ctx = data;

    ngx_uint_t                failed;
    ngx_connection_t         *c;
    ratepool_usage_t          unanswered;

    failed = (state & NGX_PEER_FAILED) && !ctx->answered;
    c = pc->connection;

    if (pc->tries) {
        pc->tries--;
    }

    if (failed && pc->cached && c && !c->read->timedout
        && !c->write->timedout)
    {
        /*
         * A keepalive connection the server had already closed: nginx
         * gives the try back, and it goes to the same key.  (A timeout
         * is no such thing: the server had the request.)
         */
        ctx->retry_same = 1;
        return;
    }

    if (!ctx->answered && ctx->held && ctx->request->upstream->request_sent
        && !ctx->usage_counted)
    {
        /*
         * Sent and never answered (the client left, the provider timed
         * out): the provider had the request, and counts and bills it.
         */
        ngx_memzero(&unanswered, sizeof(ratepool_usage_t));
        ctx->usage_counted = 1;
        ngx_http_ratepool_charge(ctx, &unanswered,
                                 RATEPOOL_USAGE_UNANSWERED, 0);
    }

    ngx_http_ratepool_release(ctx, &ctx->held, failed);

    if (failed && ctx->request->upstream->request_sent) {
        /*
         * No answer to a request that was sent: the provider may be at
         * work on it, and sending it again would pay for it twice.
         */
        pc->tries = 0;
    }
}


/*
 * Wraps the proxy's header parser: once the status and headers are in,
 * learn from them and decide whether nginx should try another key.
 * nginx retries statuses listed in proxy_next_upstream while tries > 1,
 * so the decision is expressed through u->peer.tries, and the next key
 * is held at once, so that the decision cannot be undone by another
 * worker taking it meanwhile.
 */

static ngx_int_t
ngx_http_ratepool_process_header(ngx_http_request_t *r)
{
    uint64_t                  soonest_ms;
    ngx_int_t                 rc;
    ngx_uint_t                status;
    ngx_http_upstream_t      *u;
    ngx_http_ratepool_ctx_t  *ctx;

    ctx = ngx_http_ratepool_get_ctx(r);
    u = r->upstream;

    rc = ctx->process_header(r);

    /* the proxy moves on from its status line parser to its header parser */
    if (u->process_header != ngx_http_ratepool_process_header) {
        ctx->process_header = u->process_header;
        u->process_header = ngx_http_ratepool_process_header;
    }

    if (rc != NGX_OK) {
        return rc;
    }

    ctx->answered = 1;

    status = u->headers_in.status_n;

    /* what of the error body has come with the headers says why */
    ctx->spent = ratepool_error_spent((int) status, u->buffer.pos,
                                      u->buffer.last - u->buffer.pos);
    ctx->too_large = ratepool_error_too_large((int) status, u->buffer.pos,
                                              u->buffer.last
                                              - u->buffer.pos);

    ngx_http_ratepool_learn(ctx, &u->headers_in);

    if (status >= NGX_HTTP_BAD_REQUEST
        && ngx_http_ratepool_cloud_message(r, ctx) != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (status != NGX_HTTP_TOO_MANY_REQUESTS
        && status != NGX_HTTP_UNAUTHORIZED
        && status != NGX_HTTP_FORBIDDEN
        && !ctx->spent && !ctx->overloaded)
    {
        return NGX_OK;
    }

    /* keys of other orgs may have larger limits, but rarely: none is
       asked, so that one request cannot use up every org's requests */
    if (u->peer.tries > 1 && !ctx->too_large) {
        ctx->next = ngx_http_ratepool_acquire(ctx, &soonest_ms);
        ctx->next_input = ctx->acquired_input;
    }

    if (ctx->next) {
        /* nginx re-sends on 429, not on 401 or 400; this answer reaches
           no one */
        ctx->moved_status = status;
        u->headers_in.status_n = NGX_HTTP_TOO_MANY_REQUESTS;

        (void) ngx_atomic_fetch_add(&ctx->pool->zone->sh->rerouted, 1);
        ngx_http_ratepool_history_count(ctx->pool->zone->sh,
                                        RATEPOOL_HISTORY_REROUTED);

        return NGX_OK;
    }

    /* no other key can do better: this answer goes to the client */

    u->peer.tries = 1;

    ctx->soonest_ms = ngx_http_ratepool_soonest(ctx);

    if (status == NGX_HTTP_TOO_MANY_REQUESTS
        && !ctx->spent && !ctx->overloaded && !ctx->too_large
        && ngx_http_ratepool_may_requeue(r, ctx))
    {
        return ngx_http_ratepool_requeue_sent(r, ctx);
    }

    if (ctx->spent || ctx->overloaded || ctx->too_large) {
        /*
         * The provider's own words: a spend cap is not a wait, an
         * overload is the provider's, with its retry-after, and a request
         * too large for the limit must be made smaller.
         */

    } else if (status == NGX_HTTP_TOO_MANY_REQUESTS) {
        ctx->exhausted = 1;

    } else if (status == NGX_HTTP_UNAUTHORIZED) {
        ctx->refused = 1;
    }

    /* a 403 no key could beat goes out as the provider sent it */

    return NGX_OK;
}


/*
 * Every key refused the request after it was sent, and it may wait for
 * one still (ratepool_wait): the 429 reaches no one.  The upstream is
 * finished as ngx_http_upstream_create() finishes one before it starts
 * another, and admission puts the request back in the queue; once
 * admitted again the phases go on from the content handler, which
 * starts a new upstream.  Finishing the upstream finalizes the request
 * once, and nginx does once more for the NGX_ERROR returned, after
 * which it sees the upstream finished: both are counted here.
 */

static ngx_int_t
ngx_http_ratepool_requeue_sent(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx)
{
    ngx_http_upstream_t  *u;

    u = r->upstream;

    ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                  "ratepool: every key of pool \"%V\" refused the request, "
                  "it waits again", &ctx->pool->upstream->host);

    r->main->count += 2;

    (*u->cleanup)(r);

    ngx_http_ratepool_proceed(r, ctx, ngx_http_ratepool_requeue(r, ctx));

    return NGX_ERROR;
}


static ngx_int_t
ngx_http_ratepool_reinit_request(ngx_http_request_t *r)
{
    ngx_int_t                 rc;
    ngx_http_upstream_t      *u;
    ngx_http_ratepool_ctx_t  *ctx;

    ctx = ngx_http_ratepool_get_ctx(r);
    u = r->upstream;

    rc = ctx->reinit_request(r);

    /* the proxy restarts from its status line parser on every try */
    ctx->process_header = u->process_header;
    u->process_header = ngx_http_ratepool_process_header;

    return rc;
}


static ngx_int_t
ngx_http_ratepool_init_peer(ngx_http_request_t *r,
    ngx_http_upstream_srv_conf_t *us)
{
    ngx_http_upstream_t       *u;
    ngx_http_ratepool_ctx_t   *ctx;
    ngx_http_ratepool_pool_t  *pool;

    ctx = ngx_http_ratepool_get_ctx(r);
    pool = ngx_http_conf_upstream_srv_conf(us, ngx_http_ratepool_module);

    if (ctx == NULL || ctx->pool != pool || ctx->key == NULL) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "ratepool: upstream \"%V\" is a key pool, reach it "
                      "with \"ratepool_pass\", not \"proxy_pass\"",
                      &us->host);
        return NGX_ERROR;
    }

    u = r->upstream;

    u->peer.data = ctx;
    u->peer.get = ngx_http_ratepool_get_peer;
    u->peer.free = ngx_http_ratepool_free_peer;
    u->peer.tries = pool->keys->nelts;

#if (NGX_HTTP_SSL)
    u->peer.set_session = ngx_http_ratepool_set_session;
    u->peer.save_session = ngx_http_ratepool_save_session;
#endif

    ctx->process_header = u->process_header;
    u->process_header = ngx_http_ratepool_process_header;

    ctx->reinit_request = u->reinit_request;
    u->reinit_request = ngx_http_ratepool_reinit_request;

    return NGX_OK;
}


#if (NGX_HTTP_SSL)

/* one TLS session per key and worker, as round robin keeps one per peer */

static ngx_int_t
ngx_http_ratepool_set_session(ngx_peer_connection_t *pc, void *data)
{
    ngx_http_ratepool_ctx_t  *ctx = data;

    if (ctx->key->ssl_session == NULL) {
        return NGX_OK;
    }

    return ngx_ssl_set_session(pc->connection, ctx->key->ssl_session);
}


static void
ngx_http_ratepool_save_session(ngx_peer_connection_t *pc, void *data)
{
    ngx_http_ratepool_ctx_t  *ctx = data;

    ngx_ssl_session_t  *session;

    session = ngx_ssl_get_session(pc->connection);

    if (session == NULL) {
        return;
    }

    if (ctx->key->ssl_session) {
        ngx_ssl_free_session(ctx->key->ssl_session);
    }

    ctx->key->ssl_session = session;
}

#endif


static ngx_int_t
ngx_http_ratepool_init_upstream(ngx_conf_t *cf,
    ngx_http_upstream_srv_conf_t *us)
{
    ngx_http_ratepool_pool_t       *pool;
    ngx_http_ratepool_zone_t       *zone;
    ngx_http_ratepool_main_conf_t  *rmcf;

    pool = ngx_http_conf_upstream_srv_conf(us, ngx_http_ratepool_module);
    rmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_ratepool_module);

    if (us->shm_zone) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "upstream \"%V\" is a ratepool pool: its state lives "
                      "in the ratepool_zone, remove \"zone\" in %s:%ui",
                      &us->host, us->file_name, us->line);
        return NGX_ERROR;
    }

    if (pool->keys && us->servers->nelts != pool->keys->nelts) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "upstream \"%V\" is a ratepool pool: declare its keys "
                      "with \"ratepool_key\", not \"server\" in %s:%ui",
                      &us->host, us->file_name, us->line);
        return NGX_ERROR;
    }

    if (pool->keys == NULL || pool->keys->nelts == 0) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "upstream \"%V\" has no keys, add "
                      "\"ratepool_key NAME server=HOST key_file=PATH;\" "
                      "in %s:%ui", &us->host, us->file_name, us->line);
        return NGX_ERROR;
    }

    zone = rmcf->shm_zone ? rmcf->shm_zone->data : NULL;

    if (zone == NULL
        || rmcf->shm_zone->shm.name.len != pool->zone_name.len
        || ngx_strncmp(rmcf->shm_zone->shm.name.data, pool->zone_name.data,
                       pool->zone_name.len) != 0)
    {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "upstream \"%V\" uses ratepool zone \"%V\", which is "
                      "not declared; add \"ratepool_zone %V:1m;\" to the "
                      "http block (upstream in %s:%ui)", &us->host,
                      &pool->zone_name, &pool->zone_name, us->file_name,
                      us->line);
        return NGX_ERROR;
    }

    pool->zone = zone;
    us->peer.init = ngx_http_ratepool_init_peer;

    return NGX_OK;
}


/*
 * nginx's keepalive cache matches connections by address alone.  Keys
 * whose hosts differ but share an address would then send one key's
 * requests, with its secret, over a TLS connection made and verified for
 * the other host.  Such a pool is refused when keepalive wraps it.
 */

ngx_int_t
ngx_http_ratepool_check_keepalive(ngx_conf_t *cf,
    ngx_http_ratepool_pool_t *pool)
{
    ngx_uint_t                i, j, m, n;
    ngx_http_ratepool_key_t  *keys, *a, *b;

    if (pool->upstream->peer.init_upstream == ngx_http_ratepool_init_upstream)
    {
        return NGX_OK;      /* nothing caches connections */
    }

    keys = pool->keys->elts;

    for (i = 0; i < pool->keys->nelts; i++) {
        for (j = i + 1; j < pool->keys->nelts; j++) {
            a = &keys[i];
            b = &keys[j];

            if (a->host.len == b->host.len
                && ngx_strncasecmp(a->host.data, b->host.data, a->host.len)
                   == 0)
            {
                continue;
            }

            for (m = 0; m < a->naddrs; m++) {
                for (n = 0; n < b->naddrs; n++) {

                    if (ngx_cmp_sockaddr(a->addrs[m].sockaddr,
                                         a->addrs[m].socklen,
                                         b->addrs[n].sockaddr,
                                         b->addrs[n].socklen, 1)
                        != NGX_OK)
                    {
                        continue;
                    }

                    ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                                  "keys \"%V\" and \"%V\" of upstream \"%V\" "
                                  "reach different hosts at one address "
                                  "%V, and keepalive would reuse one "
                                  "key's connections for the other; put "
                                  "them in separate upstreams or remove "
                                  "\"keepalive\"", &a->name, &b->name,
                                  &pool->upstream->host, &a->addrs[m].name);
                    return NGX_ERROR;
                }
            }
        }
    }

    return NGX_OK;
}


/* ratepool zone=NAME */

char *
ngx_http_ratepool_upstream(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_ratepool_pool_t *pool = conf;

    u_char                           c;
    ngx_str_t                       *value, s;
    ngx_int_t                        n;
    ngx_uint_t                       i;
    ngx_http_ratepool_pool_t       **pp;
    ngx_http_upstream_srv_conf_t    *uscf;
    ngx_http_ratepool_main_conf_t   *rmcf;

    if (pool->upstream) {
        return "is duplicate";
    }

    uscf = ngx_http_conf_get_module_srv_conf(cf, ngx_http_upstream_module);

    if (uscf->host.len > RATEPOOL_NAME_MAX) {
        return "needs an upstream name of up to 64 characters";
    }

    /* the name goes into JSON and log lines as it is */
    for (i = 0; i < uscf->host.len; i++) {
        c = uscf->host.data[i];

        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
              || (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '.'))
        {
            return "needs an upstream name of letters, digits, \"-\", "
                   "\"_\" or \".\"";
        }
    }

    if (uscf->peer.init_upstream) {
        return "must come first in the upstream block, before \"keepalive\" "
               "and any other balancer";
    }

    value = cf->args->elts;

    if (value[1].len <= 5 || ngx_strncmp(value[1].data, "zone=", 5) != 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid parameter \"%V\", use \"zone=NAME\" "
                           "with the name of a ratepool_zone", &value[1]);
        return NGX_CONF_ERROR;
    }

    pool->zone_name.data = value[1].data + 5;
    pool->zone_name.len = value[1].len - 5;
    pool->upstream = uscf;
    pool->queue_max = RATEPOOL_QUEUE_DEFAULT;
    pool->overload = RATEPOOL_OVERLOAD_DEFAULT;

    for (i = 2; i < cf->args->nelts; i++) {

        if (value[i].len > 6 && ngx_strncmp(value[i].data, "queue=", 6) == 0)
        {
            n = ngx_atoi(value[i].data + 6, value[i].len - 6);

            if (n == NGX_ERROR) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid parameter \"%V\", use "
                                   "\"queue=N\" with the number of requests "
                                   "that may wait for the pool (see "
                                   "ratepool_wait)", &value[i]);
                return NGX_CONF_ERROR;
            }

            pool->queue_max = (ngx_uint_t) n;
            continue;
        }

        if (value[i].len > 9
            && ngx_strncmp(value[i].data, "overload=", 9) == 0)
        {
            s.data = value[i].data + 9;
            s.len = value[i].len - 9;

            pool->overload = ngx_parse_time(&s, 0);

            if (pool->overload == (ngx_msec_t) NGX_ERROR
                || pool->overload > RATEPOOL_OVERLOAD_MAX)
            {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid parameter \"%V\", use "
                                   "\"overload=TIME\" (0 to 10m) for how "
                                   "long a server that answered 529 or 503 "
                                   "ranks after the others", &value[i]);
                return NGX_CONF_ERROR;
            }

            continue;
        }

        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid parameter \"%V\", use \"queue=N\" or "
                           "\"overload=TIME\"", &value[i]);
        return NGX_CONF_ERROR;
    }

    uscf->peer.init_upstream = ngx_http_ratepool_init_upstream;

    rmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_ratepool_module);

    pp = ngx_array_push(&rmcf->pools);
    if (pp == NULL) {
        return NGX_CONF_ERROR;
    }

    *pp = pool;

    return NGX_CONF_OK;
}

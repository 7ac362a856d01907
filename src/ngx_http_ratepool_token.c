
/*
 * Copyright (C) ratepool authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool.h"
#include "ngx_http_ratepool_tls.h"
#include "ngx_http_ratepool_token.h"
#include "ratepool_jwt.h"


/*
 * Google access tokens for provider=vertex keys: each worker looks every
 * second, and the first to see a key's token near its end (or none)
 * takes the fetch on itself in the zone, trades a freshly signed JWT for
 * a token at the key's token_url over its own non-blocking connection
 * (TLS verified), and puts the token in the zone for all workers.  A key
 * without a valid token is out of rotation; a failed fetch is logged
 * and tried again later, backing off.  No request ever waits for one.
 */


#define RATEPOOL_TOKEN_LOOK_MS    1000
#define RATEPOOL_TOKEN_TIMEOUT_MS 10000
#define RATEPOOL_TOKEN_MARGIN     300     /* s before the end: a new one */
#define RATEPOOL_TOKEN_VALID_MIN  10      /* s left: still used */
#define RATEPOOL_TOKEN_REPLY_MAX  16384
#define RATEPOOL_TOKEN_SCOPE      \
    "https://www.googleapis.com/auth/cloud-platform"


typedef struct {
    ngx_pool_t                     *pool;
    ngx_peer_connection_t           peer;
    ngx_http_ratepool_key_t        *key;
    ngx_http_ratepool_zone_t       *zone;
    ngx_buf_t                      *request;
    ngx_buf_t                      *reply;
    ngx_log_t                       log;
} ngx_http_ratepool_fetch_t;


static void ngx_http_ratepool_tokens_look(ngx_event_t *ev);
static void ngx_http_ratepool_fetch(ngx_http_ratepool_main_conf_t *rmcf,
    ngx_http_ratepool_key_t *key);
static ngx_buf_t *ngx_http_ratepool_token_request(ngx_pool_t *pool,
    ngx_http_ratepool_key_t *key);
#if (NGX_HTTP_SSL)
static void ngx_http_ratepool_fetch_handshake(ngx_connection_t *c);
#endif
static void ngx_http_ratepool_fetch_connected(ngx_event_t *ev);
static void ngx_http_ratepool_fetch_write(ngx_event_t *ev);
static void ngx_http_ratepool_fetch_read(ngx_event_t *ev);
static void ngx_http_ratepool_fetch_done(ngx_http_ratepool_fetch_t *f,
    const char *error);


ngx_int_t
ngx_http_ratepool_tokens_init(ngx_cycle_t *cycle,
    ngx_http_ratepool_main_conf_t *rmcf)
{
    if (rmcf->google_keys == 0) {
        return NGX_OK;
    }

    rmcf->tokens.handler = ngx_http_ratepool_tokens_look;
    rmcf->tokens.data = rmcf;
    rmcf->tokens.log = cycle->log;
    rmcf->tokens.cancelable = 1;

    /* at once: a worker that starts wants its keys usable */
    ngx_add_timer(&rmcf->tokens, 1);

    return NGX_OK;
}


/* whether a key's token may be sent now (the zone locked) */

ngx_int_t
ngx_http_ratepool_token_valid(ngx_http_ratepool_key_t *key, time_t now)
{
    /* with time left for the request to reach Google */
    return key->sh->token_len
           && key->sh->token_expires
              > now + ngx_min(RATEPOOL_TOKEN_VALID_MIN,
                              key->sh->token_lifetime / 4);
}


/* "Bearer <token>" for this try, copied from the zone */

ngx_int_t
ngx_http_ratepool_token_header(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx)
{
    u_char                   *p;
    ngx_slab_pool_t          *shpool;
    ngx_http_ratepool_key_t  *key;

    key = ctx->key;
    shpool = ctx->pool->zone->shpool;

    p = ngx_pnalloc(r->pool, sizeof("Bearer ") - 1 + RATEPOOL_TOKEN_MAX);
    if (p == NULL) {
        return NGX_ERROR;
    }

    ctx->signed_auth.data = p;
    p = ngx_cpymem(p, "Bearer ", sizeof("Bearer ") - 1);

    ngx_shmtx_lock(&shpool->mutex);

    if (!ngx_http_ratepool_token_valid(key, ngx_time())) {
        ngx_shmtx_unlock(&shpool->mutex);

        /* chosen a moment ago, its token ran out since */
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "ratepool: key \"%V\" has no valid access token",
                      &key->name);
        return NGX_ERROR;
    }

    p = ngx_cpymem(p, key->sh->token, key->sh->token_len);

    ngx_shmtx_unlock(&shpool->mutex);

    ctx->signed_auth.len = p - ctx->signed_auth.data;

    return NGX_OK;
}


static void
ngx_http_ratepool_tokens_look(ngx_event_t *ev)
{
    ngx_http_ratepool_main_conf_t *rmcf = ev->data;

    time_t                      now, margin;
    ngx_uint_t                  i, j, take;
    ngx_slab_pool_t            *shpool;
    ngx_http_ratepool_key_t    *keys;
    ngx_http_ratepool_pool_t  **pools;
    ngx_http_ratepool_key_sh_t *sh;
    ngx_http_ratepool_zone_t   *zone;

    if (ngx_exiting || ngx_quit || ngx_terminate) {
        return;
    }

    zone = rmcf->shm_zone->data;
    shpool = zone->shpool;
    pools = rmcf->pools.elts;
    now = ngx_time();

    for (i = 0; i < rmcf->pools.nelts; i++) {
        keys = pools[i]->keys->elts;

        for (j = 0; j < pools[i]->keys->nelts; j++) {
            if (keys[j].credential != RATEPOOL_CREDENTIAL_GOOGLE) {
                continue;
            }

            sh = keys[j].sh;

            ngx_shmtx_lock(&shpool->mutex);

            /* a new token well before the old one ends, by one worker */
            margin = ngx_min(RATEPOOL_TOKEN_MARGIN, sh->token_lifetime / 2);

            take = ((sh->token_len == 0 || sh->token_expires - margin <= now)
                    && sh->token_next <= now);

            if (take) {
                sh->token_next = now + RATEPOOL_TOKEN_TIMEOUT_MS / 1000 + 1;
            }

            ngx_shmtx_unlock(&shpool->mutex);

            if (take) {
                ngx_http_ratepool_fetch(rmcf, &keys[j]);
            }
        }
    }

    ngx_add_timer(ev, RATEPOOL_TOKEN_LOOK_MS);
}


static void
ngx_http_ratepool_fetch(ngx_http_ratepool_main_conf_t *rmcf,
    ngx_http_ratepool_key_t *key)
{
    ngx_int_t                   rc;
    ngx_pool_t                 *pool;
    ngx_connection_t           *c;
    ngx_http_ratepool_fetch_t  *f;

    pool = ngx_create_pool(4096, ngx_cycle->log);
    if (pool == NULL) {
        return;
    }

    f = ngx_pcalloc(pool, sizeof(ngx_http_ratepool_fetch_t));
    if (f == NULL) {
        ngx_destroy_pool(pool);
        return;
    }

    f->pool = pool;
    f->key = key;
    f->zone = rmcf->shm_zone->data;
    f->log = *ngx_cycle->log;

    f->request = ngx_http_ratepool_token_request(pool, key);
    f->reply = ngx_create_temp_buf(pool, RATEPOOL_TOKEN_REPLY_MAX);

    if (f->request == NULL || f->reply == NULL) {
        ngx_http_ratepool_fetch_done(f, "out of memory");
        return;
    }

    f->peer.sockaddr = key->google->token_addrs[0].sockaddr;
    f->peer.socklen = key->google->token_addrs[0].socklen;
    f->peer.name = &key->google->token_addrs[0].name;
    f->peer.get = ngx_event_get_peer;
    f->peer.log = &f->log;
    f->peer.log_error = NGX_ERROR_ERR;

    rc = ngx_event_connect_peer(&f->peer);

    if (rc == NGX_ERROR || rc == NGX_BUSY || rc == NGX_DECLINED) {
        ngx_http_ratepool_fetch_done(f, "cannot connect");
        return;
    }

    c = f->peer.connection;
    c->data = f;
    c->pool = pool;
    c->log = &f->log;
    c->read->log = c->log;
    c->write->log = c->log;

    c->write->handler = ngx_http_ratepool_fetch_connected;
    c->read->handler = ngx_http_ratepool_fetch_connected;

    ngx_add_timer(c->write, RATEPOOL_TOKEN_TIMEOUT_MS);

    if (rc == NGX_OK) {
        ngx_http_ratepool_fetch_connected(c->write);
    }
}


/* the form Google's token endpoint takes, with a freshly signed JWT */

static ngx_buf_t *
ngx_http_ratepool_token_request(ngx_pool_t *pool,
    ngx_http_ratepool_key_t *key)
{
    size_t                       len;
    u_char                       jwt[4096];
    ngx_buf_t                   *b;
    ratepool_jwt_t               claims;
    ngx_http_ratepool_google_t  *g;

    static u_char  grant[] =
        "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer"
        "&assertion=";

    g = key->google;

    ngx_memzero(&claims, sizeof(ratepool_jwt_t));
    claims.key = g->pkey;
    claims.kid = (char *) g->kid.data;
    claims.kid_len = g->kid.len;
    claims.email = (char *) g->email.data;
    claims.email_len = g->email.len;
    claims.aud = (char *) g->token_url.data;
    claims.aud_len = g->token_url.len;
    claims.scope = RATEPOOL_TOKEN_SCOPE;
    claims.now = ngx_time();

    len = ratepool_jwt_sign(&claims, jwt, sizeof(jwt));
    if (len == 0) {
        return NULL;
    }

    b = ngx_create_temp_buf(pool, 512 + g->token_path.len
                                  + g->token_host.len + len);
    if (b == NULL) {
        return NULL;
    }

    /* HTTP/1.0: the answer comes whole, not chunked, and then the close */

    b->last = ngx_sprintf(b->last,
                          "POST %V HTTP/1.0" CRLF
                          "Host: %V" CRLF
                          "Content-Type: application/x-www-form-urlencoded"
                          CRLF
                          "Content-Length: %uz" CRLF
                          "User-Agent: ratepool" CRLF CRLF
                          "%s",
                          &g->token_path, &g->token_host,
                          sizeof(grant) - 1 + len, grant);
    b->last = ngx_cpymem(b->last, jwt, len);

    return b;
}


static void
ngx_http_ratepool_fetch_connected(ngx_event_t *ev)
{
    ngx_connection_t           *c;
    ngx_http_ratepool_fetch_t  *f;

    c = ev->data;
    f = c->data;

    if (ev->timedout) {
        ngx_http_ratepool_fetch_done(f, "timed out");
        return;
    }

    if (!ev->write) {
        return;     /* a read before the connection is up: nothing yet */
    }

#if (NGX_HTTP_SSL)

    if (f->key->google->ssl && c->ssl == NULL) {
        if (ngx_http_ratepool_tls_connect(c, f->key->google->ssl,
                                          &f->key->google->token_name,
                                          f->key->google->token_sni,
                                          ngx_http_ratepool_fetch_handshake)
            != NGX_OK)
        {
            ngx_http_ratepool_fetch_done(f, "cannot start TLS");
        }

        return;
    }

#endif

    c->write->handler = ngx_http_ratepool_fetch_write;
    c->read->handler = ngx_http_ratepool_fetch_read;

    ngx_http_ratepool_fetch_write(c->write);
}


#if (NGX_HTTP_SSL)

static void
ngx_http_ratepool_fetch_handshake(ngx_connection_t *c)
{
    const char                 *why;
    ngx_http_ratepool_fetch_t  *f;

    f = c->data;

    if (!c->ssl->handshaked) {
        ngx_http_ratepool_fetch_done(f, "the TLS handshake failed");
        return;
    }

    why = ngx_http_ratepool_tls_verify(c, &f->key->google->token_name,
                                       f->key->google->token_sni);

    if (why) {
        ngx_log_error(NGX_LOG_ERR, c->log, 0,
                      "ratepool: the certificate of \"%V\" does not verify: "
                      "%s", &f->key->google->token_url, why);
        ngx_http_ratepool_fetch_done(f, "its certificate does not verify");
        return;
    }

    c->write->handler = ngx_http_ratepool_fetch_write;
    c->read->handler = ngx_http_ratepool_fetch_read;

    ngx_http_ratepool_fetch_write(c->write);
}

#endif


static void
ngx_http_ratepool_fetch_write(ngx_event_t *ev)
{
    ssize_t                     n;
    ngx_buf_t                  *b;
    ngx_connection_t           *c;
    ngx_http_ratepool_fetch_t  *f;

    c = ev->data;
    f = c->data;
    b = f->request;

    if (ev->timedout) {
        ngx_http_ratepool_fetch_done(f, "timed out");
        return;
    }

    while (b->pos < b->last) {
        n = c->send(c, b->pos, b->last - b->pos);

        if (n == NGX_AGAIN) {
            if (ngx_handle_write_event(ev, 0) != NGX_OK) {
                ngx_http_ratepool_fetch_done(f, "cannot write");
            }

            return;
        }

        if (n == NGX_ERROR || n == 0) {
            ngx_http_ratepool_fetch_done(f, "the connection broke");
            return;
        }

        b->pos += n;
    }

    /* sent: the answer may come */
    c->write->handler = ngx_http_ratepool_fetch_write;

    if (c->read->ready) {
        ngx_http_ratepool_fetch_read(c->read);
        return;
    }

    if (ngx_handle_read_event(c->read, 0) != NGX_OK) {
        ngx_http_ratepool_fetch_done(f, "cannot read");
    }
}


static void
ngx_http_ratepool_fetch_read(ngx_event_t *ev)
{
    ssize_t                     n;
    ngx_buf_t                  *b;
    ngx_connection_t           *c;
    ngx_http_ratepool_fetch_t  *f;

    c = ev->data;
    f = c->data;
    b = f->reply;

    if (ev->timedout || c->write->timedout) {
        ngx_http_ratepool_fetch_done(f, "timed out");
        return;
    }

    for ( ;; ) {
        if (b->last == b->end) {
            ngx_http_ratepool_fetch_done(f, "its answer is too large");
            return;
        }

        n = c->recv(c, b->last, b->end - b->last);

        if (n == NGX_AGAIN) {
            if (ngx_handle_read_event(ev, 0) != NGX_OK) {
                ngx_http_ratepool_fetch_done(f, "cannot read");
            }

            return;
        }

        if (n == NGX_ERROR) {
            ngx_http_ratepool_fetch_done(f, "the connection broke");
            return;
        }

        if (n == 0) {
            break;      /* the answer is whole */
        }

        b->last += n;
    }

    ngx_http_ratepool_fetch_done(f, NULL);
}


/*
 * The answer, or why there is none: the token goes into the zone, or the
 * key stays out of rotation, and the fetch is tried again later, the
 * longer the more it failed.
 */

static void
ngx_http_ratepool_fetch_done(ngx_http_ratepool_fetch_t *f, const char *error)
{
    time_t                       now;
    size_t                       len;
    u_char                       token[RATEPOOL_TOKEN_MAX], status[4], *p,
                                *body;
    uint64_t                     lifetime;
    ngx_uint_t                   failures, level;
    ngx_buf_t                   *b;
    ngx_slab_pool_t             *shpool;
    ngx_http_ratepool_key_sh_t  *sh;
    const u_char                *from, *to;

    b = f->reply;
    len = 0;
    lifetime = 0;

    if (error == NULL) {
        p = b->pos;
        body = ngx_strnstr(p, CRLF CRLF, b->last - p);

        if (body) {
            body += 4;
        }

        ngx_memzero(status, sizeof(status));

        if (b->last - p > 12 && ngx_strncmp(p, "HTTP/1.", 7) == 0) {
            ngx_memcpy(status, p + 9, 3);
        }

        if (body == NULL || ngx_strncmp(status, "200", 3) != 0) {
            error = "it refused the service account's assertion";

            if (body) {
                ngx_log_error(NGX_LOG_ERR, &f->log, 0,
                              "ratepool: key \"%V\": the token endpoint "
                              "answered %s: %*s", &f->key->name, status,
                              ngx_min(b->last - body, 300), body);
            }

        } else if (ratepool_json_top_string(body, b->last - body,
                                            "access_token", 12, &from, &to)
                   && to > from && to - from <= RATEPOOL_TOKEN_MAX)
        {
            len = ratepool_json_unescape(from, to, token, sizeof(token));

            p = ngx_strnstr(body, "\"expires_in\"", b->last - body);

            if (p) {
                p += sizeof("\"expires_in\"") - 1;

                while (p < b->last && (*p == ' ' || *p == ':')) {
                    p++;
                }

                while (p < b->last && *p >= '0' && *p <= '9'
                       && lifetime < 100000)
                {
                    lifetime = lifetime * 10 + (*p++ - '0');
                }
            }

            if (lifetime == 0 || len == 0) {
                error = "its answer has no access token";
            }

            if (ngx_http_ratepool_header_bad(token, len) < len) {
                error = "its access token cannot be sent in a header";
            }

        } else {
            error = "its answer has no access token";
        }
    }

    sh = f->key->sh;
    shpool = f->zone->shpool;
    now = ngx_time();

    ngx_shmtx_lock(&shpool->mutex);

    if (error) {
        failures = ++sh->token_failures;

        /* again in 2, 4, ... 64 s */
        sh->token_next = now + ((time_t) 1 << ngx_min(failures, 6));

    } else {
        failures = 0;
        sh->token_failures = 0;
        sh->token_len = len;
        ngx_memcpy(sh->token, token, len);
        sh->token_lifetime = (time_t) lifetime;
        sh->token_expires = now + (time_t) lifetime;
        sh->token_next = 0;
    }

    ngx_shmtx_unlock(&shpool->mutex);

    if (error) {
        /* the first failure of a streak is an error, the next warnings */
        level = (failures == 1) ? NGX_LOG_ERR : NGX_LOG_WARN;

        ngx_log_error(level, &f->log, 0,
                      "ratepool: key \"%V\" could not get an access token "
                      "from \"%V\": %s; without one it is out of rotation",
                      &f->key->name, &f->key->google->token_url, error);

    } else {
        ngx_log_error(NGX_LOG_INFO, &f->log, 0,
                      "ratepool: key \"%V\" has a new access token for "
                      "%uL s", &f->key->name, lifetime);
    }

    if (f->peer.connection) {
#if (NGX_HTTP_SSL)
        if (f->peer.connection->ssl) {
            /* at once: nothing to wait for, nothing left behind */
            f->peer.connection->ssl->no_wait_shutdown = 1;
            f->peer.connection->ssl->no_send_shutdown = 1;
            (void) ngx_ssl_shutdown(f->peer.connection);
        }
#endif
        ngx_close_connection(f->peer.connection);
        f->peer.connection = NULL;
    }

    ngx_destroy_pool(f->pool);
}

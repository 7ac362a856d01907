
/*
 * Copyright (C) ratepool authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <hiredis/hiredis.h>

#include "ngx_http_ratepool.h"
#include "ngx_http_ratepool_redis.h"
#include "ngx_http_ratepool_sentinel.h"
#include "ngx_http_ratepool_tls.h"
#include "ratepool_resp.h"


/*
 * Each worker keeps one connection to Redis, owned by nginx's event loop:
 * commands are appended to one buffer and written once per loop
 * iteration, so that the requests of an iteration share a write, and
 * replies come back in the order the commands went.  hiredis only reads
 * the replies.  A command is never waited for: a request that waits for
 * its reply has its own timer, and goes on without it (redis_fail=).
 *
 * The breaker: after RATEPOOL_REDIS_FAILURES failures in a row (a lost
 * connection, an error reply, a request that gave up waiting) the
 * connection is closed, and a new one is tried after a growing pause.
 * While there is none, requests are decided without Redis.
 */

#define RATEPOOL_REDIS_FAILURES     3
#define RATEPOOL_REDIS_OUT_SIZE     (256 * 1024)
#define RATEPOOL_REDIS_PENDING_MAX  4096
#define RATEPOOL_REDIS_CONNECT_MS   1000
#define RATEPOOL_REDIS_BACKOFF_MS   200
#define RATEPOOL_REDIS_BACKOFF_MAX  5000
#define RATEPOOL_REDIS_BEAT_MS      5000

#define RATEPOOL_REDIS_DOWN         0
#define RATEPOOL_REDIS_CONNECTING   1
#define RATEPOOL_REDIS_READY        2
#define RATEPOOL_REDIS_TLS          3       /* its TLS handshake: nothing
                                               is sent before it is over */


struct ngx_http_ratepool_redis_s {
    ngx_http_ratepool_redis_conf_t *conf;
    ngx_http_ratepool_main_conf_t  *rmcf;
    ngx_http_ratepool_shctx_t      *sh;
    ngx_peer_connection_t           peer;
    ngx_connection_t               *c;
    redisReader                    *reader;
    ratepool_resp_check_t           check;      /* before the reader */
    ngx_queue_t                     sent;       /* waiting for replies */
    ngx_queue_t                     free;
    ngx_uint_t                      pending;
    u_char                         *out;
    size_t                          out_len;
    ngx_uint_t                      state;
    ngx_uint_t                      failures;   /* in a row */
    ngx_uint_t                      backoff;
    ngx_event_t                     reconnect;
    ngx_event_t                     flush;
    ngx_event_t                     beat;
    ngx_http_ratepool_redis_beat_pt beat_handler;   /* the store's, when */
    void                           *beat_data;      /* ready and on beat */
    ngx_addr_t                     *addr;       /* where it is now */
    ngx_http_ratepool_sentinel_t   *sentinel;   /* who says where, or NULL */
    ngx_uint_t                      seed_next;  /* a cluster's node to try */
    ngx_addr_t                      owner;      /* the node that owns the */
    ngx_sockaddr_t                  owner_sockaddr;     /* zone's slot, as */
    u_char                          owner_name[NGX_SOCKADDR_STRLEN];
                                                /* a MOVED said */
    unsigned                        owner_known:1;
    ngx_uint_t                      moves;      /* MOVEDs followed since a
                                                   call was answered */
    ngx_log_t                      *log;
};


static void ngx_http_ratepool_redis_connect(ngx_http_ratepool_redis_t *redis);
static void ngx_http_ratepool_redis_find(ngx_http_ratepool_redis_t *redis);
static void ngx_http_ratepool_redis_found(void *data, ngx_addr_t *master,
    const char *why);
static void ngx_http_ratepool_redis_master_is(
    ngx_http_ratepool_redis_t *redis, ngx_addr_t *master, const char *who);
static ngx_int_t ngx_http_ratepool_redis_moved(
    ngx_http_ratepool_redis_t *redis, redisReply *reply);
static void ngx_http_ratepool_redis_drop(ngx_http_ratepool_redis_t *redis);
static void ngx_http_ratepool_redis_reset(ngx_http_ratepool_redis_t *redis);
static void ngx_http_ratepool_redis_fail_sent(
    ngx_http_ratepool_redis_t *redis);
static ngx_int_t ngx_http_ratepool_redis_connected(
    ngx_http_ratepool_redis_t *redis, ngx_event_t *wev);
static void ngx_http_ratepool_redis_close(ngx_http_ratepool_redis_t *redis);
static const char *ngx_http_ratepool_redis_lost(
    ngx_http_ratepool_redis_t *redis, const char *why);
#if (NGX_HTTP_SSL)
static void ngx_http_ratepool_redis_tls_start(ngx_event_t *ev);
static void ngx_http_ratepool_redis_tls_done(ngx_connection_t *c);
#endif
static void ngx_http_ratepool_redis_down(ngx_http_ratepool_redis_t *redis,
    const char *why, ngx_str_t *detail);
static void ngx_http_ratepool_redis_reconnect(ngx_event_t *ev);
static void ngx_http_ratepool_redis_write(ngx_event_t *wev);
static void ngx_http_ratepool_redis_read(ngx_event_t *rev);
static void ngx_http_ratepool_redis_flush(ngx_event_t *ev);
static void ngx_http_ratepool_redis_beat(ngx_event_t *ev);
static uint64_t ngx_http_ratepool_redis_usec(void);
static ngx_int_t ngx_http_ratepool_redis_append(
    ngx_http_ratepool_redis_t *redis, ngx_http_ratepool_redis_cmd_t *cmd);
static ngx_http_ratepool_redis_cmd_t *ngx_http_ratepool_redis_command(
    ngx_http_ratepool_redis_t *redis, ratepool_resp_arg_t *args,
    ngx_uint_t nargs, ngx_http_ratepool_redis_pt handler);
static void ngx_http_ratepool_redis_handshake(
    ngx_http_ratepool_redis_cmd_t *cmd, void *reply);
static void ngx_http_ratepool_redis_ready(ngx_http_ratepool_redis_cmd_t *cmd,
    void *reply);
static void ngx_http_ratepool_redis_free(ngx_http_ratepool_redis_t *redis,
    ngx_http_ratepool_redis_cmd_t *cmd);


ngx_int_t
ngx_http_ratepool_redis_init_process(ngx_cycle_t *cycle,
    ngx_http_ratepool_main_conf_t *rmcf, ngx_http_ratepool_redis_beat_pt beat,
    void *data)
{
    ngx_http_ratepool_redis_t  *redis;

    redis = ngx_pcalloc(cycle->pool, sizeof(ngx_http_ratepool_redis_t));
    if (redis == NULL) {
        return NGX_ERROR;
    }

    redis->out = ngx_palloc(cycle->pool, RATEPOOL_REDIS_OUT_SIZE);
    if (redis->out == NULL) {
        return NGX_ERROR;
    }

    redis->conf = rmcf->redis;
    redis->rmcf = rmcf;
    redis->sh = ((ngx_http_ratepool_zone_t *) rmcf->shm_zone->data)->sh;
    redis->log = cycle->log;

    ngx_queue_init(&redis->sent);
    ngx_queue_init(&redis->free);

    redis->reconnect.handler = ngx_http_ratepool_redis_reconnect;
    redis->reconnect.data = redis;
    redis->reconnect.log = cycle->log;
    redis->reconnect.cancelable = 1;

    redis->flush.handler = ngx_http_ratepool_redis_flush;
    redis->flush.data = redis;
    redis->flush.log = cycle->log;

    redis->beat.handler = ngx_http_ratepool_redis_beat;
    redis->beat.data = redis;
    redis->beat.log = cycle->log;
    redis->beat.cancelable = 1;
    redis->beat_handler = beat;
    redis->beat_data = data;

    rmcf->redis->conn = redis;

    if (rmcf->redis->nsentinels) {
        redis->sentinel = ngx_http_ratepool_sentinel_create(cycle,
                                                 rmcf->redis,
                                                 ngx_http_ratepool_redis_found,
                                                 redis);
        if (redis->sentinel == NULL) {
            return NGX_ERROR;
        }

    } else if (!rmcf->redis->cluster) {
        redis->addr = &rmcf->redis->addrs[0];

    } else {
        /* each worker starts at another node */
        redis->seed_next = ngx_random() % rmcf->redis->naddrs;
        redis->addr = &rmcf->redis->addrs[redis->seed_next];
    }

    ngx_http_ratepool_redis_find(redis);

    return NGX_OK;
}


/* connects where Redis is: asked of its sentinels first, if it has them */

static void
ngx_http_ratepool_redis_find(ngx_http_ratepool_redis_t *redis)
{
    ngx_http_ratepool_redis_conf_t  *conf;

    conf = redis->conf;

    if (redis->sentinel) {
        ngx_http_ratepool_sentinel_ask(redis->sentinel);
        return;
    }

    if (conf->cluster) {
        /* its nodes in turn; one that does not own the zone's slot
           answers MOVED, which says which does */
        redis->addr = &conf->addrs[redis->seed_next++ % conf->naddrs];
        redis->owner_known = 0;
    }

    ngx_http_ratepool_redis_connect(redis);
}


/*
 * The sentinels' answer: the master, where the connection goes; a new
 * one is a failover, counted once for the gateway and logged.
 */

static void
ngx_http_ratepool_redis_found(void *data, ngx_addr_t *master,
    const char *why)
{
    ngx_http_ratepool_redis_t *redis = data;

    if (ngx_exiting || ngx_terminate || ngx_quit) {
        return;
    }

    if (master == NULL) {
        ngx_http_ratepool_redis_down(redis, why, NULL);
        return;
    }

    ngx_http_ratepool_redis_master_is(redis, master, "its sentinels say");

    redis->addr = master;

    ngx_http_ratepool_redis_connect(redis);
}


/*
 * Where the master is now (a sentinel's answer, or the node a cluster
 * said owns the zone's slot): a new one is a failover, counted once for
 * the gateway and logged.
 */

static void
ngx_http_ratepool_redis_master_is(ngx_http_ratepool_redis_t *redis,
    ngx_addr_t *master, const char *who)
{
    ngx_str_t                   was, what;
    ngx_slab_pool_t            *shpool;
    ngx_http_ratepool_zone_t   *zone;
    ngx_http_ratepool_shctx_t  *sh;
    u_char                      old[NGX_SOCKADDR_STRLEN];

    zone = redis->rmcf->shm_zone->data;
    shpool = zone->shpool;
    sh = redis->sh;

    ngx_shmtx_lock(&shpool->mutex);

    was.len = sh->redis_master_len;
    was.data = old;
    ngx_memcpy(old, sh->redis_master, was.len);

    if (was.len != master->name.len
        || ngx_memcmp(old, master->name.data, was.len) != 0)
    {
        ngx_memcpy(sh->redis_master, master->name.data, master->name.len);
        sh->redis_master_len = master->name.len;

        if (was.len) {
            (void) ngx_atomic_fetch_add(&sh->redis_failovers, 1);
        }

        ngx_shmtx_unlock(&shpool->mutex);

        /* a new master is tried at once, not after the old one's pause */
        redis->backoff = 0;

        /* a sentinel's master has a name; a cluster's, the zone's slot */
        ngx_str_set(&what, "the zone's slot");

        if (!redis->conf->cluster) {
            what = redis->conf->master;
        }

        if (was.len) {
            ngx_log_error(NGX_LOG_WARN, redis->log, 0,
                          "ratepool: redis master \"%V\" moved from %V "
                          "to %V, as %s", &what, &was, &master->name, who);
        } else {
            ngx_log_error(NGX_LOG_NOTICE, redis->log, 0,
                          "ratepool: redis master \"%V\" is at %V, as %s",
                          &what, &master->name, who);
        }

    } else {
        ngx_shmtx_unlock(&shpool->mutex);
    }
}


void
ngx_http_ratepool_redis_exit_process(ngx_http_ratepool_main_conf_t *rmcf)
{
    ngx_http_ratepool_redis_t  *redis;

    redis = rmcf->redis->conn;

    if (redis == NULL) {
        return;
    }

    ngx_http_ratepool_redis_close(redis);

    if (redis->sentinel) {
        ngx_http_ratepool_sentinel_close(redis->sentinel);
    }

    if (redis->reader) {
        redisReaderFree(redis->reader);
        redis->reader = NULL;
    }
}


ngx_http_ratepool_redis_t *
ngx_http_ratepool_redis_get(ngx_http_ratepool_main_conf_t *rmcf)
{
    return rmcf->redis ? rmcf->redis->conn : NULL;
}


/* a request may ask Redis: the breaker is closed */

ngx_int_t
ngx_http_ratepool_redis_usable(ngx_http_ratepool_redis_t *redis)
{
    return redis && redis->state != RATEPOOL_REDIS_DOWN
           && redis->pending < RATEPOOL_REDIS_PENDING_MAX;
}


static void
ngx_http_ratepool_redis_connect(ngx_http_ratepool_redis_t *redis)
{
    ngx_int_t                        rc;
    ngx_str_t                        arg[3];
    ngx_uint_t                       i, n;
    ngx_connection_t                *c;
    ngx_http_ratepool_redis_conf_t  *conf;
    ratepool_resp_arg_t              args[3];
    u_char                           db[NGX_INT_T_LEN];

    conf = redis->conf;

    ngx_memzero(&redis->peer, sizeof(ngx_peer_connection_t));

    redis->peer.sockaddr = redis->addr->sockaddr;
    redis->peer.socklen = redis->addr->socklen;
    redis->peer.name = &redis->addr->name;
    redis->peer.get = ngx_event_get_peer;
    redis->peer.log = redis->log;
    redis->peer.log_error = NGX_ERROR_ERR;

    rc = ngx_event_connect_peer(&redis->peer);

    if (rc == NGX_ERROR || rc == NGX_BUSY || rc == NGX_DECLINED) {
        if (redis->peer.connection) {
            ngx_close_connection(redis->peer.connection);
        }

        ngx_http_ratepool_redis_down(redis, "could not connect", NULL);
        return;
    }

    c = redis->peer.connection;
    c->data = redis;

    if (redis->peer.sockaddr->sa_family != AF_UNIX) {
        /* small commands, each awaited: never held back for an ACK */
        (void) ngx_tcp_nodelay(c);
    }
    c->read->handler = ngx_http_ratepool_redis_read;
    c->write->handler = ngx_http_ratepool_redis_write;
    c->log = redis->log;
    c->read->log = redis->log;
    c->write->log = redis->log;

    redis->c = c;
    redis->state = RATEPOOL_REDIS_CONNECTING;
    redis->out_len = 0;

    /* counted as it is, as closing it uncounts it */
    (void) ngx_atomic_fetch_add(&redis->sh->redis_connected, 1);

#if (NGX_HTTP_SSL)
    if (conf->ssl) {
        /* OpenSSL's state for the connection is allocated from its pool */
        c->pool = ngx_create_pool(512, redis->log);
        if (c->pool == NULL) {
            ngx_http_ratepool_redis_down(redis, "out of memory", NULL);
            return;
        }

        /* the handshake's commands wait in redis->out for TLS */
        redis->state = RATEPOOL_REDIS_TLS;
        c->read->handler = ngx_http_ratepool_redis_tls_start;
        c->write->handler = ngx_http_ratepool_redis_tls_start;
    }
#endif

    ratepool_resp_check_init(&redis->check);
    redis->reader = redisReaderCreate();
    if (redis->reader == NULL) {
        ngx_http_ratepool_redis_down(redis, "out of memory", NULL);
        return;
    }

    /* the handshake goes first; requests may follow it at once */

    if (conf->password.len) {
        n = 0;
        ngx_str_set(&arg[n], "AUTH");
        n++;

        if (conf->user.len) {
            arg[n++] = conf->user;
        }

        arg[n++] = conf->password;

        for (i = 0; i < n; i++) {
            args[i].data = arg[i].data;
            args[i].len = arg[i].len;
        }

        if (ngx_http_ratepool_redis_command(redis, args, n,
                                   ngx_http_ratepool_redis_handshake) == NULL)
        {
            return;
        }
    }

    if (conf->db) {
        args[0].data = (u_char *) "SELECT";
        args[0].len = 6;
        args[1].data = db;
        args[1].len = ngx_sprintf(db, "%ui", conf->db) - db;

        if (ngx_http_ratepool_redis_command(redis, args, 2,
                                   ngx_http_ratepool_redis_handshake) == NULL)
        {
            return;
        }
    }

    args[0].data = (u_char *) "PING";
    args[0].len = 4;

    if (ngx_http_ratepool_redis_command(redis, args, 1,
                                        ngx_http_ratepool_redis_ready)
        == NULL)
    {
        return;
    }

    /* the handshake must be answered in time too */
    ngx_add_timer(c->read, RATEPOOL_REDIS_CONNECT_MS);

    if (rc == NGX_AGAIN) {
        ngx_add_timer(c->write, RATEPOOL_REDIS_CONNECT_MS);
        return;
    }

    c->write->handler(c->write);
}


/*
 * "MOVED <slot> <ip>:<port>" (or "ASK ..."): every call waiting on this
 * connection is answered as failed (redis_fail decides them), and the
 * connection goes to that node at once, without the breaker.
 */

static ngx_int_t
ngx_http_ratepool_redis_moved(ngx_http_ratepool_redis_t *redis,
    redisReply *reply)
{
    u_char     *p, *last, *colon;
    ngx_int_t   port;
    in_addr_t   inaddr;

    last = (u_char *) reply->str + reply->len;

    /* the address, after the slot */
    p = ngx_strlchr((u_char *) reply->str, last, ' ');
    p = p ? ngx_strlchr(p + 1, last, ' ') : NULL;

    if (p == NULL) {
        return NGX_ERROR;
    }

    p++;
    colon = NULL;

    for (last = p; last < (u_char *) reply->str + reply->len; last++) {
        if (*last == ':') {
            colon = last;
        }
    }

    if (colon == NULL || colon == p) {
        return NGX_ERROR;
    }

    port = ngx_atoi(colon + 1, last - colon - 1);
    inaddr = ngx_inet_addr(p, colon - p);

    if (port < 1 || port > 65535 || inaddr == INADDR_NONE) {
        return NGX_ERROR;
    }

    ngx_memzero(&redis->owner_sockaddr, sizeof(ngx_sockaddr_t));
    redis->owner_sockaddr.sockaddr_in.sin_family = AF_INET;
    redis->owner_sockaddr.sockaddr_in.sin_addr.s_addr = inaddr;
    redis->owner_sockaddr.sockaddr_in.sin_port = htons((in_port_t) port);

    redis->owner.sockaddr = &redis->owner_sockaddr.sockaddr;
    redis->owner.socklen = sizeof(struct sockaddr_in);
    redis->owner.name.data = redis->owner_name;
    redis->owner.name.len = ngx_sock_ntop(redis->owner.sockaddr,
                                          redis->owner.socklen,
                                          redis->owner_name,
                                          NGX_SOCKADDR_STRLEN, 1);

    if (++redis->moves > redis->conf->naddrs) {
        /* nodes that send each other's MOVED: the breaker, with its pause */
        redis->moves = 0;
        ngx_http_ratepool_redis_down(redis, "its nodes keep saying MOVED "
                                     "to each other", NULL);
        return NGX_OK;
    }

    ngx_http_ratepool_redis_drop(redis);

    /* the owner is said so once it answers a call */
    redis->owner_known = 0;
    redis->addr = &redis->owner;

    ngx_http_ratepool_redis_connect(redis);

    return NGX_OK;
}


/* connect() is over: did it work? */

static ngx_int_t
ngx_http_ratepool_redis_connected(ngx_http_ratepool_redis_t *redis,
    ngx_event_t *wev)
{
    int                err;
    socklen_t          len;
    ngx_connection_t  *c;

    if (!wev->timer_set) {
        return NGX_OK;
    }

    ngx_del_timer(wev);

    c = wev->data;
    err = 0;
    len = sizeof(int);

    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, (void *) &err, &len) == -1) {
        err = ngx_socket_errno;
    }

    if (err) {
        ngx_log_error(NGX_LOG_INFO, redis->log, err,
                      "ratepool: connect() to redis at \"%V\" failed",
                      &redis->conf->server);
        ngx_http_ratepool_redis_down(redis, "could not connect", NULL);
        return NGX_ERROR;
    }

    return NGX_OK;
}


/*
 * Why a connection was lost: TLS 1.3 refuses a client certificate it
 * wanted only after the handshake, as the first command goes or its
 * answer is read.
 */

static const char *
ngx_http_ratepool_redis_lost(ngx_http_ratepool_redis_t *redis,
    const char *why)
{
    if (redis->c && redis->c->ssl
        && redis->state == RATEPOOL_REDIS_CONNECTING)
    {
        return "it ended the TLS connection before answering (does it "
               "want a client certificate: redis_tls_cert=?)";
    }

    return why;
}


static void
ngx_http_ratepool_redis_close(ngx_http_ratepool_redis_t *redis)
{
    ngx_pool_t  *pool;

    if (redis->c == NULL) {
        return;
    }

#if (NGX_HTTP_SSL)
    if (redis->c->ssl) {
        /* nothing more is read from it: its close_notify is not awaited */
        redis->c->ssl->no_wait_shutdown = 1;
        redis->c->ssl->no_send_shutdown = 1;
        (void) ngx_ssl_shutdown(redis->c);
    }
#endif

    pool = redis->c->pool;

    ngx_close_connection(redis->c);
    redis->c = NULL;

    if (pool) {
        ngx_destroy_pool(pool);
    }

    (void) ngx_atomic_fetch_add(&redis->sh->redis_connected,
                                (ngx_atomic_int_t) -1);
}


#if (NGX_HTTP_SSL)

static void
ngx_http_ratepool_redis_tls_start(ngx_event_t *ev)
{
    ngx_connection_t                *c;
    ngx_http_ratepool_redis_t       *redis;
    ngx_http_ratepool_redis_conf_t  *conf;

    c = ev->data;
    redis = c->data;
    conf = redis->conf;

    if (ev->timedout) {
        ngx_http_ratepool_redis_down(redis, "connecting timed out", NULL);
        return;
    }

    if (!ev->write || c->ssl) {
        return;     /* a read before the connection is up: nothing yet */
    }

    if (ngx_http_ratepool_redis_connected(redis, ev) != NGX_OK) {
        return;
    }

    if (ngx_http_ratepool_tls_connect(c, conf->ssl, &conf->tls_name,
                                      conf->tls_sni,
                                      ngx_http_ratepool_redis_tls_done)
        != NGX_OK)
    {
        ngx_http_ratepool_redis_down(redis, "could not start TLS", NULL);
    }
}


/* the handshake is over: a certificate that does not verify is a failure */

static void
ngx_http_ratepool_redis_tls_done(ngx_connection_t *c)
{
    const char                 *why;
    ngx_str_t                   detail;
    ngx_http_ratepool_redis_t  *redis;

    redis = c->data;

    if (!c->ssl->handshaked) {
        ngx_http_ratepool_redis_down(redis, c->read->timedout
                                     ? "the TLS handshake timed out"
                                     : "the TLS handshake failed (is it a "
                                       "TLS port? does it want a client "
                                       "certificate: redis_tls_cert=?)",
                                     NULL);
        return;
    }

    why = ngx_http_ratepool_tls_verify(c, &redis->conf->tls_name,
                                       redis->conf->tls_sni);

    if (why) {
        detail.data = (u_char *) why;
        detail.len = ngx_strlen(why);
        ngx_http_ratepool_redis_down(redis, "its certificate does not "
                                     "verify: check redis_tls_ca= and "
                                     "redis_tls_name=", &detail);
        return;
    }

    redis->state = RATEPOOL_REDIS_CONNECTING;
    c->read->handler = ngx_http_ratepool_redis_read;
    c->write->handler = ngx_http_ratepool_redis_write;

    ngx_http_ratepool_redis_write(c->write);
}


#endif


/* a handshake command failed: Redis is down for this gateway */

static void
ngx_http_ratepool_redis_handshake(ngx_http_ratepool_redis_cmd_t *cmd,
    void *data)
{
    redisReply                 *reply = data;
    ngx_str_t                   detail;
    ngx_http_ratepool_redis_t  *redis;

    redis = cmd->data;

    if (reply == NULL || reply->type != REDIS_REPLY_ERROR) {
        return;
    }

    detail.data = (u_char *) reply->str;
    detail.len = ngx_min(reply->len, 200);

    ngx_http_ratepool_redis_down(redis,
                                 redis->conf->password.len
                                 ? "refused the handshake: check "
                                   "redis_password_file= and redis_db="
                                 : "refused the handshake: check redis_db=",
                                 &detail);
}


static void
ngx_http_ratepool_redis_ready(ngx_http_ratepool_redis_cmd_t *cmd, void *data)
{
    redisReply                 *reply = data;
    ngx_str_t                   detail;
    ngx_http_ratepool_redis_t  *redis;

    redis = cmd->data;

    if (reply == NULL) {
        return;
    }

    if (reply->type == REDIS_REPLY_ERROR) {
        detail.data = (u_char *) reply->str;
        detail.len = ngx_min(reply->len, 200);
        ngx_http_ratepool_redis_down(redis, "refused PING: set "
                                     "redis_password_file= if it needs a "
                                     "password", &detail);
        return;
    }

    redis->state = RATEPOOL_REDIS_READY;
    redis->failures = 0;
    redis->backoff = 0;

    if (redis->c && redis->c->read->timer_set) {
        ngx_del_timer(redis->c->read);
    }

    if (ngx_atomic_cmp_set(&redis->sh->redis_down, 1, 0)) {
        redis->sh->local_share = 0;
        ngx_log_error(NGX_LOG_NOTICE, redis->log, 0,
                      "ratepool: redis at \"%V\" is back, limits are "
                      "shared again", &redis->conf->server);
    }

    redis->beat_handler(redis, redis->beat_data, 1);
}


static void
ngx_http_ratepool_redis_reconnect(ngx_event_t *ev)
{
    ngx_http_ratepool_redis_t  *redis = ev->data;

    if (ngx_exiting || ngx_terminate || ngx_quit) {
        return;
    }

    ngx_http_ratepool_redis_find(redis);
}


static void
ngx_http_ratepool_redis_beat(ngx_event_t *ev)
{
    ngx_http_ratepool_redis_t  *redis = ev->data;

    if (redis->state == RATEPOOL_REDIS_READY) {
        redis->beat_handler(redis, redis->beat_data, 0);
    }
}


/*
 * The breaker opens: the connection is closed, whatever waited for a
 * reply goes on without one, and a new connection is tried later.  The
 * first worker to see Redis go says so in the log; the first to see it
 * back says that.
 */

static void
ngx_http_ratepool_redis_down(ngx_http_ratepool_redis_t *redis,
    const char *why, ngx_str_t *detail)
{
    ngx_msec_t                      pause;
    ngx_str_t                       none = ngx_null_string;
    static const char              *policy[] = {
        "redis_fail=local: each gateway keeps its share of every limit",
        "redis_fail=open: each gateway admits up to the whole of every limit",
        "redis_fail=closed: requests get 503"
    };

    ngx_http_ratepool_redis_reset(redis);

    if (ngx_atomic_cmp_set(&redis->sh->redis_down, 0, 1)) {
        redis->sh->redis_since = ngx_time();

        if (redis->conf->fail == RATEPOOL_REDIS_FAIL_LOCAL) {
            redis->sh->local_share = ngx_max(redis->sh->gateways, 1);
        }

        ngx_log_error(NGX_LOG_ERR, redis->log, 0,
                      "ratepool: redis at \"%V\" is down: %s%s%V%s; "
                      "until it is back, %s",
                      (redis->addr && (redis->sentinel || redis->conf->cluster))
                      ? &redis->addr->name : &redis->conf->server,
                      why, detail ? " (" : "", detail ? detail : &none,
                      detail ? ")" : "", policy[redis->conf->fail]);
    }

    if (!(ngx_exiting || ngx_terminate || ngx_quit)
        && !redis->reconnect.timer_set)
    {
        pause = RATEPOOL_REDIS_BACKOFF_MS << ngx_min(redis->backoff, 5);
        pause = ngx_min(pause, RATEPOOL_REDIS_BACKOFF_MAX);
        pause = pause * 3 / 4 + ngx_random() % (pause / 2 + 1);

        if (redis->backoff < 8) {
            redis->backoff++;
        }

        ngx_add_timer(&redis->reconnect, pause);
    }

    /* answered last, as they may ask for more */
    ngx_http_ratepool_redis_fail_sent(redis);
}


/* a cluster's MOVED: the connection goes elsewhere, the breaker stays */

static void
ngx_http_ratepool_redis_drop(ngx_http_ratepool_redis_t *redis)
{
    ngx_http_ratepool_redis_reset(redis);
    ngx_http_ratepool_redis_fail_sent(redis);
}


/* the connection is closed, and what was on its way is forgotten */

static void
ngx_http_ratepool_redis_reset(ngx_http_ratepool_redis_t *redis)
{
    ngx_http_ratepool_redis_close(redis);

    if (redis->reader) {
        redisReaderFree(redis->reader);
        redis->reader = NULL;
    }

    redis->state = RATEPOOL_REDIS_DOWN;
    redis->out_len = 0;
    redis->failures = 0;

    if (redis->flush.posted) {
        ngx_delete_posted_event(&redis->flush);
    }

    if (redis->beat.timer_set) {
        ngx_del_timer(&redis->beat);
    }
}


/* the calls sent and not answered: answered as failed */

static void
ngx_http_ratepool_redis_fail_sent(ngx_http_ratepool_redis_t *redis)
{
    ngx_queue_t                     failed, *q;
    ngx_http_ratepool_redis_cmd_t  *cmd;

    ngx_queue_init(&failed);

    if (!ngx_queue_empty(&redis->sent)) {
        failed = redis->sent;
        failed.next->prev = &failed;
        failed.prev->next = &failed;
        ngx_queue_init(&redis->sent);
    }

    while (!ngx_queue_empty(&failed)) {
        q = ngx_queue_head(&failed);
        ngx_queue_remove(q);
        cmd = ngx_queue_data(q, ngx_http_ratepool_redis_cmd_t, queue);

        if (cmd->handler) {
            cmd->handler(cmd, NULL);
        }

        ngx_http_ratepool_redis_free(redis, cmd);
    }
}


/* a request gave up on its reply: that counts toward the breaker */

void
ngx_http_ratepool_redis_timed_out(ngx_http_ratepool_redis_t *redis)
{
    (void) ngx_atomic_fetch_add(&redis->sh->redis_timeouts, 1);

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, redis->log, 0,
                   "ratepool: redis timed out, %ui failures in a row of %d "
                   "open the breaker", redis->failures + 1,
                   RATEPOOL_REDIS_FAILURES);

    if (redis->state != RATEPOOL_REDIS_DOWN
        && ++redis->failures >= RATEPOOL_REDIS_FAILURES)
    {
        ngx_http_ratepool_redis_down(redis, "it did not answer in time",
                                     NULL);
    }
}


static ngx_http_ratepool_redis_cmd_t *
ngx_http_ratepool_redis_alloc(ngx_http_ratepool_redis_t *redis)
{
    ngx_queue_t                    *q;
    ngx_http_ratepool_redis_cmd_t  *cmd;

    if (!ngx_queue_empty(&redis->free)) {
        q = ngx_queue_head(&redis->free);
        ngx_queue_remove(q);
        cmd = ngx_queue_data(q, ngx_http_ratepool_redis_cmd_t, queue);

    } else {
        /* commands are reused, never freed: their number stays bounded */
        cmd = ngx_palloc(ngx_cycle->pool,
                         sizeof(ngx_http_ratepool_redis_cmd_t));
        if (cmd == NULL) {
            return NULL;
        }
    }

    cmd->handler = NULL;
    cmd->data = NULL;
    cmd->nargs = 0;
    cmd->op = 0;
    cmd->tail_len = 0;
    cmd->script = 0;
    cmd->resent = 0;

    redis->pending++;

    return cmd;
}


static void
ngx_http_ratepool_redis_free(ngx_http_ratepool_redis_t *redis,
    ngx_http_ratepool_redis_cmd_t *cmd)
{
    redis->pending--;
    ngx_queue_insert_head(&redis->free, &cmd->queue);
}


/* a plain command, of the handshake */

static ngx_http_ratepool_redis_cmd_t *
ngx_http_ratepool_redis_command(ngx_http_ratepool_redis_t *redis,
    ratepool_resp_arg_t *args, ngx_uint_t nargs,
    ngx_http_ratepool_redis_pt handler)
{
    ngx_http_ratepool_redis_cmd_t  *cmd;

    cmd = ngx_http_ratepool_redis_alloc(redis);
    if (cmd == NULL) {
        ngx_http_ratepool_redis_down(redis, "out of memory", NULL);
        return NULL;
    }

    cmd->handler = handler;
    cmd->data = redis;
    cmd->tail_len = ratepool_resp_format(cmd->tail, RATEPOOL_REDIS_TAIL_MAX,
                                         args, nargs);

    if (cmd->tail_len == 0 || ngx_http_ratepool_redis_append(redis, cmd)
                              != NGX_OK)
    {
        ngx_http_ratepool_redis_free(redis, cmd);
        ngx_http_ratepool_redis_down(redis, "a command does not fit", NULL);
        return NULL;
    }

    return cmd;
}


/*
 * A call of the script: EVALSHA, or EVAL once Redis says it does not
 * have the script (it restarted, failed over, or was flushed).  args
 * are numkeys, the keys and the arguments; args[op] is the one-letter
 * operation.  NULL: not sent, the caller decides without Redis.
 */

ngx_http_ratepool_redis_cmd_t *
ngx_http_ratepool_redis_script(ngx_http_ratepool_redis_t *redis,
    ratepool_resp_arg_t *args, ngx_uint_t nargs, ngx_uint_t op,
    ngx_http_ratepool_redis_pt handler, void *data)
{
    u_char                         *p, *end;
    ngx_uint_t                      i;
    ngx_http_ratepool_redis_cmd_t  *cmd;

    if (!ngx_http_ratepool_redis_usable(redis)) {
        return NULL;
    }

    cmd = ngx_http_ratepool_redis_alloc(redis);
    if (cmd == NULL) {
        return NULL;
    }

    p = cmd->tail;
    end = cmd->tail + RATEPOOL_REDIS_TAIL_MAX;

    for (i = 0; i < nargs; i++) {
        if ((size_t) (end - p) < ratepool_resp_arg_size(args[i].len)) {
            ngx_http_ratepool_redis_free(redis, cmd);
            return NULL;
        }

        if (i == op) {
            cmd->op = (p - cmd->tail) + ratepool_resp_arg_size(args[i].len)
                      - 3;
        }

        p = ratepool_resp_arg(p, args[i].data, args[i].len);
    }

    cmd->tail_len = p - cmd->tail;
    cmd->nargs = nargs;
    cmd->script = 1;
    cmd->handler = handler;
    cmd->data = data;

    if (ngx_http_ratepool_redis_append(redis, cmd) != NGX_OK) {
        ngx_http_ratepool_redis_free(redis, cmd);
        return NULL;
    }

    (void) ngx_atomic_fetch_add(&redis->sh->redis_calls, 1);

    return cmd;
}


/* the same call with another operation, answered by nobody */

void
ngx_http_ratepool_redis_resend(ngx_http_ratepool_redis_t *redis,
    ngx_http_ratepool_redis_cmd_t *cmd, u_char op)
{
    ngx_http_ratepool_redis_cmd_t  *copy;

    if (!ngx_http_ratepool_redis_usable(redis)) {
        return;
    }

    copy = ngx_http_ratepool_redis_alloc(redis);
    if (copy == NULL) {
        return;
    }

    ngx_memcpy(copy->tail, cmd->tail, cmd->tail_len);
    copy->tail_len = cmd->tail_len;
    copy->nargs = cmd->nargs;
    copy->op = cmd->op;
    copy->script = 1;
    copy->tail[copy->op] = op;

    if (ngx_http_ratepool_redis_append(redis, copy) != NGX_OK) {
        ngx_http_ratepool_redis_free(redis, copy);
        return;
    }

    (void) ngx_atomic_fetch_add(&redis->sh->redis_calls, 1);
}


/* into the output buffer, written once this loop iteration is done */

static uint64_t
ngx_http_ratepool_redis_usec(void)
{
    struct timespec  ts;

    (void) clock_gettime(CLOCK_MONOTONIC, &ts);

    return (uint64_t) ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}


static ngx_int_t
ngx_http_ratepool_redis_append(ngx_http_ratepool_redis_t *redis,
    ngx_http_ratepool_redis_cmd_t *cmd)
{
    u_char                          *p;
    size_t                           need;
    ngx_http_ratepool_redis_conf_t  *conf;

    conf = redis->conf;
    need = cmd->tail_len;

    if (cmd->script) {
        need += ratepool_resp_header_size(cmd->nargs + 2)
                + (cmd->resent ? ratepool_resp_arg_size(4)
                                 + ratepool_resp_arg_size(
                                       ngx_strlen(ratepool_script))
                               : ratepool_resp_arg_size(7)
                                 + ratepool_resp_arg_size(40));
    }

    if (RATEPOOL_REDIS_OUT_SIZE - redis->out_len < need) {
        return NGX_ERROR;
    }

    p = redis->out + redis->out_len;

    if (cmd->script) {
        p = ratepool_resp_header(p, cmd->nargs + 2);

        if (cmd->resent) {
            p = ratepool_resp_arg(p, (u_char *) "EVAL", 4);
            p = ratepool_resp_arg(p, (u_char *) ratepool_script,
                                  ngx_strlen(ratepool_script));

        } else {
            p = ratepool_resp_arg(p, (u_char *) "EVALSHA", 7);
            p = ratepool_resp_arg(p, conf->sha, 40);
        }
    }

    p = ngx_cpymem(p, cmd->tail, cmd->tail_len);

    redis->out_len = p - redis->out;
    cmd->sent = ngx_http_ratepool_redis_usec();

    ngx_queue_insert_tail(&redis->sent, &cmd->queue);

    if (!redis->flush.posted) {
        ngx_post_event(&redis->flush, &ngx_posted_events);
    }

    return NGX_OK;
}


/* what is gathered goes out now, not at the end of the loop iteration */

void
ngx_http_ratepool_redis_send_now(ngx_http_ratepool_redis_t *redis)
{
    if (redis->flush.posted) {
        ngx_delete_posted_event(&redis->flush);
    }

    ngx_http_ratepool_redis_flush(&redis->flush);
}


static void
ngx_http_ratepool_redis_flush(ngx_event_t *ev)
{
    ngx_http_ratepool_redis_t  *redis = ev->data;

    if (redis->c && redis->state != RATEPOOL_REDIS_DOWN
        && redis->state != RATEPOOL_REDIS_TLS
        && !redis->c->write->timer_set)
    {
        ngx_http_ratepool_redis_write(redis->c->write);
    }
}


static void
ngx_http_ratepool_redis_write(ngx_event_t *wev)
{
    ssize_t                     n;
    ngx_connection_t           *c;
    ngx_http_ratepool_redis_t  *redis;

    c = wev->data;
    redis = c->data;

    if (wev->timedout) {
        ngx_http_ratepool_redis_down(redis, "connecting timed out", NULL);
        return;
    }

    if (redis->state == RATEPOOL_REDIS_TLS) {
        return;     /* the commands wait for the TLS handshake */
    }

    if (ngx_http_ratepool_redis_connected(redis, wev) != NGX_OK) {
        return;
    }

    while (redis->out_len) {
        n = c->send(c, redis->out, redis->out_len);

        if (n == NGX_AGAIN) {
            break;
        }

        if (n == NGX_ERROR || n == 0) {
            ngx_http_ratepool_redis_down(redis,
                                     ngx_http_ratepool_redis_lost(redis,
                                                 "the connection broke"),
                                     NULL);
            return;
        }

        redis->out_len -= n;

        if (redis->out_len) {
            ngx_memmove(redis->out, redis->out + n, redis->out_len);
        }
    }

    if (ngx_handle_write_event(wev, 0) != NGX_OK) {
        ngx_http_ratepool_redis_down(redis, "the connection broke", NULL);
    }
}


static void
ngx_http_ratepool_redis_read(ngx_event_t *rev)
{
    void                           *item;
    ssize_t                         n;
    ngx_str_t                       detail;
    uint64_t                        us;
    int                             rc;
    ngx_queue_t                    *q;
    redisReply                     *reply;
    ngx_connection_t               *c;
    ngx_atomic_uint_t               avg;
    ngx_http_ratepool_redis_t      *redis;
    ngx_http_ratepool_redis_cmd_t  *cmd;
    u_char                          buf[16384];

    c = rev->data;
    redis = c->data;

    if (rev->timedout) {
        ngx_http_ratepool_redis_down(redis, "it did not answer the "
                                     "handshake in time", NULL);
        return;
    }

    for ( ;; ) {
        n = c->recv(c, buf, sizeof(buf));

        if (n == NGX_AGAIN) {
            break;
        }

        if (n == NGX_ERROR || n == 0) {
            ngx_http_ratepool_redis_down(redis,
                                     ngx_http_ratepool_redis_lost(redis,
                                                 "it closed the connection"),
                                     NULL);
            return;
        }

        /* nothing is allocated for a reply no script call can have */

        rc = ratepool_resp_check(&redis->check, buf, n);

        if (rc != RATEPOOL_RESP_OK) {
            ngx_http_ratepool_redis_down(redis,
                                     rc == RATEPOOL_RESP_TOO_LARGE
                                     ? "it sent a reply larger than any "
                                       "ratepool asks for"
                                     : "it sent a reply that is not RESP2",
                                     NULL);
            return;
        }

        if (redisReaderFeed(redis->reader, (char *) buf, n) != REDIS_OK) {
            ngx_http_ratepool_redis_down(redis, "out of memory", NULL);
            return;
        }

        for ( ;; ) {
            item = NULL;

            if (redisReaderGetReply(redis->reader, &item) != REDIS_OK) {
                ngx_http_ratepool_redis_down(redis, "it sent a reply that "
                                             "could not be read", NULL);
                return;
            }

            if (item == NULL) {
                break;
            }

            reply = item;

            if (ngx_queue_empty(&redis->sent)) {
                freeReplyObject(reply);
                ngx_http_ratepool_redis_down(redis, "it sent a reply to "
                                             "nothing", NULL);
                return;
            }

            q = ngx_queue_head(&redis->sent);
            ngx_queue_remove(q);
            cmd = ngx_queue_data(q, ngx_http_ratepool_redis_cmd_t, queue);

            if (reply->type == REDIS_REPLY_ERROR && cmd->script
                && !cmd->resent
                && ngx_strncmp(reply->str, "NOSCRIPT", 8) == 0)
            {
                /* the script cache is empty: the script itself, once */
                (void) ngx_atomic_fetch_add(&redis->sh->redis_noscript, 1);
                freeReplyObject(reply);

                cmd->resent = 1;

                if (ngx_http_ratepool_redis_append(redis, cmd) != NGX_OK) {
                    if (cmd->handler) {
                        cmd->handler(cmd, NULL);
                    }

                    ngx_http_ratepool_redis_free(redis, cmd);
                }

                continue;
            }

            us = ngx_http_ratepool_redis_usec() - cmd->sent;
            avg = redis->sh->redis_latency_us;
            redis->sh->redis_latency_us = avg - avg / 8 + us / 8;

            if (reply->type == REDIS_REPLY_ERROR && redis->conf->cluster
                && ngx_strncmp(reply->str, "MOVED ", 6) == 0)
            {
                /*
                 * The zone's slot is another node's: the connection goes
                 * there, and this call is decided by redis_fail.  (An
                 * ASK, the slot being migrated, is an error answer like
                 * any other: redis_fail decides until the migration is
                 * over and the new owner is said by MOVED.)
                 */
                if (cmd->handler) {
                    cmd->handler(cmd, NULL);
                }

                ngx_http_ratepool_redis_free(redis, cmd);

                rc = ngx_http_ratepool_redis_moved(redis, reply);
                freeReplyObject(reply);

                if (rc != NGX_OK) {
                    ngx_http_ratepool_redis_down(redis, "it sent a MOVED "
                                                 "that could not be read",
                                                 NULL);
                }

                return;
            }

            if (reply->type == REDIS_REPLY_ERROR
                && (redis->sentinel || redis->conf->cluster)
                && ngx_strncmp(reply->str, "READONLY", 8) == 0)
            {
                /* a failover made it a replica: find the new master */
                if (cmd->handler) {
                    cmd->handler(cmd, NULL);
                }

                freeReplyObject(reply);
                ngx_http_ratepool_redis_free(redis, cmd);
                ngx_http_ratepool_redis_down(redis, "it is a replica now, "
                                             "the master is looked for",
                                             NULL);
                return;
            }

            if (reply->type == REDIS_REPLY_ERROR) {
                (void) ngx_atomic_fetch_add(&redis->sh->redis_errors, 1);

                detail.data = (u_char *) reply->str;
                detail.len = ngx_min(reply->len, 200);

                ngx_log_error(NGX_LOG_ERR, redis->log, 0,
                              "ratepool: redis at \"%V\" answered an error: "
                              "%V", &redis->conf->server, &detail);

                redis->failures++;

            } else {
                redis->failures = 0;
                redis->moves = 0;

                if (redis->conf->cluster && cmd->script
                    && !redis->owner_known)
                {
                    /* this node answers for the zone's slot */
                    redis->owner_known = 1;
                    ngx_http_ratepool_redis_master_is(redis, redis->addr,
                                                      "the cluster says");
                }
            }

            if (cmd->handler) {
                cmd->handler(cmd, reply);
            }

            freeReplyObject(reply);
            ngx_http_ratepool_redis_free(redis, cmd);

            if (redis->state == RATEPOOL_REDIS_DOWN) {
                /* the handler found the handshake refused */
                return;
            }

            if (redis->failures >= RATEPOOL_REDIS_FAILURES) {
                ngx_http_ratepool_redis_down(redis, "it answered errors",
                                             NULL);
                return;
            }
        }
    }

    if (ngx_handle_read_event(rev, 0) != NGX_OK) {
        ngx_http_ratepool_redis_down(redis, "the connection broke", NULL);
    }
}


/* the heartbeat's timer, once a beat is answered */

void
ngx_http_ratepool_redis_beat_later(ngx_http_ratepool_redis_t *redis)
{
    if (redis->state != RATEPOOL_REDIS_DOWN && !redis->beat.timer_set) {
        ngx_add_timer(&redis->beat, RATEPOOL_REDIS_BEAT_MS);
    }
}

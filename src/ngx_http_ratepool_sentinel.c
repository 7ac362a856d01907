
/*
 * Copyright (C) ratepool authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <hiredis/hiredis.h>

#include "ngx_http_ratepool.h"
#include "ngx_http_ratepool_sentinel.h"
#include "ratepool_resp.h"


/*
 * Where a Redis master is, as its sentinels say (redis_sentinel=,
 * redis_master=): one question, "SENTINEL get-master-addr-by-name", to
 * one sentinel at a time, the next one if it cannot answer, on a
 * connection of its own in the worker's event loop.  The Redis
 * connection asks before each time it connects, so a failover is
 * followed when the old master goes away.
 */


#define RATEPOOL_SENTINEL_TIMEOUT_MS  1000
#define RATEPOOL_SENTINEL_REPLY_MAX   1024


struct ngx_http_ratepool_sentinel_s {
    ngx_http_ratepool_redis_conf_t *conf;
    ngx_peer_connection_t           peer;
    ngx_uint_t                      next;       /* the sentinel to ask */
    ngx_uint_t                      tried;      /* of them, this time */
    u_char                          out[512];
    size_t                          out_len;
    size_t                          sent;
    redisReader                    *reader;
    size_t                          read;
    ngx_http_ratepool_sentinel_pt   handler;
    void                           *data;
    ngx_addr_t                      master;
    ngx_sockaddr_t                  sockaddr;
    u_char                          name[NGX_SOCKADDR_STRLEN];
    ngx_log_t                      *log;
};


static void ngx_http_ratepool_sentinel_connect(
    ngx_http_ratepool_sentinel_t *s);
static void ngx_http_ratepool_sentinel_write(ngx_event_t *wev);
static void ngx_http_ratepool_sentinel_read(ngx_event_t *rev);
static void ngx_http_ratepool_sentinel_failed(ngx_http_ratepool_sentinel_t *s,
    const char *why);
static ngx_int_t ngx_http_ratepool_sentinel_answer(
    ngx_http_ratepool_sentinel_t *s, redisReply *reply);


ngx_http_ratepool_sentinel_t *
ngx_http_ratepool_sentinel_create(ngx_cycle_t *cycle,
    ngx_http_ratepool_redis_conf_t *conf, ngx_http_ratepool_sentinel_pt handler,
    void *data)
{
    u_char                        *p;
    ngx_http_ratepool_sentinel_t  *s;

    s = ngx_pcalloc(cycle->pool, sizeof(ngx_http_ratepool_sentinel_t));
    if (s == NULL) {
        return NULL;
    }

    s->conf = conf;
    s->handler = handler;
    s->data = data;
    s->log = cycle->log;

    /* the question never changes */
    p = ngx_cpymem(s->out, "*3\r\n", 4);
    p = ratepool_resp_arg(p, (u_char *) "SENTINEL", 8);
    p = ratepool_resp_arg(p, (u_char *) "get-master-addr-by-name", 23);
    p = ratepool_resp_arg(p, conf->master.data, conf->master.len);
    s->out_len = p - s->out;

    /* each worker starts with another sentinel: they share the load */
    s->next = ngx_random() % conf->nsentinels;

    return s;
}


void
ngx_http_ratepool_sentinel_ask(ngx_http_ratepool_sentinel_t *s)
{
    if (s->peer.connection) {
        return;     /* a question is on its way */
    }

    s->tried = 0;

    ngx_http_ratepool_sentinel_connect(s);
}


void
ngx_http_ratepool_sentinel_close(ngx_http_ratepool_sentinel_t *s)
{
    if (s->peer.connection) {
        ngx_close_connection(s->peer.connection);
        s->peer.connection = NULL;
    }

    if (s->reader) {
        redisReaderFree(s->reader);
        s->reader = NULL;
    }
}


static void
ngx_http_ratepool_sentinel_connect(ngx_http_ratepool_sentinel_t *s)
{
    ngx_int_t          rc;
    ngx_addr_t        *addr;
    ngx_connection_t  *c;

    addr = &s->conf->sentinels[s->next % s->conf->nsentinels];
    s->next++;
    s->tried++;

    ngx_memzero(&s->peer, sizeof(ngx_peer_connection_t));

    s->peer.sockaddr = addr->sockaddr;
    s->peer.socklen = addr->socklen;
    s->peer.name = &addr->name;
    s->peer.get = ngx_event_get_peer;
    s->peer.log = s->log;
    s->peer.log_error = NGX_ERROR_ERR;

    rc = ngx_event_connect_peer(&s->peer);

    if (rc == NGX_ERROR || rc == NGX_BUSY || rc == NGX_DECLINED) {
        if (s->peer.connection) {
            ngx_close_connection(s->peer.connection);
            s->peer.connection = NULL;
        }

        ngx_http_ratepool_sentinel_failed(s, "could not connect");
        return;
    }

    c = s->peer.connection;
    c->data = s;
    c->log = s->log;
    c->read->log = s->log;
    c->write->log = s->log;
    c->read->handler = ngx_http_ratepool_sentinel_read;
    c->write->handler = ngx_http_ratepool_sentinel_write;

    s->sent = 0;
    s->read = 0;
    s->reader = redisReaderCreate();
    if (s->reader == NULL) {
        ngx_http_ratepool_sentinel_failed(s, "out of memory");
        return;
    }

    ngx_add_timer(c->read, RATEPOOL_SENTINEL_TIMEOUT_MS);

    if (rc == NGX_OK) {
        ngx_http_ratepool_sentinel_write(c->write);
    }
}


static void
ngx_http_ratepool_sentinel_write(ngx_event_t *wev)
{
    ssize_t                        n;
    ngx_connection_t              *c;
    ngx_http_ratepool_sentinel_t  *s;

    c = wev->data;
    s = c->data;

    while (s->sent < s->out_len) {
        n = c->send(c, s->out + s->sent, s->out_len - s->sent);

        if (n == NGX_AGAIN) {
            break;
        }

        if (n == NGX_ERROR || n == 0) {
            ngx_http_ratepool_sentinel_failed(s, "could not connect");
            return;
        }

        s->sent += n;
    }

    if (ngx_handle_write_event(wev, 0) != NGX_OK) {
        ngx_http_ratepool_sentinel_failed(s, "could not connect");
    }
}


static void
ngx_http_ratepool_sentinel_read(ngx_event_t *rev)
{
    void                          *item;
    ssize_t                        n;
    ngx_connection_t              *c;
    ngx_http_ratepool_sentinel_t  *s;
    u_char                         buf[RATEPOOL_SENTINEL_REPLY_MAX];

    c = rev->data;
    s = c->data;

    if (rev->timedout) {
        ngx_http_ratepool_sentinel_failed(s, "it did not answer in time");
        return;
    }

    for ( ;; ) {
        n = c->recv(c, buf, sizeof(buf));

        if (n == NGX_AGAIN) {
            break;
        }

        if (n == NGX_ERROR || n == 0) {
            ngx_http_ratepool_sentinel_failed(s, "it closed the connection");
            return;
        }

        /* an address and a port: anything longer is not that answer */
        s->read += n;

        if (s->read > RATEPOOL_SENTINEL_REPLY_MAX
            || redisReaderFeed(s->reader, (char *) buf, n) != REDIS_OK)
        {
            ngx_http_ratepool_sentinel_failed(s, "its answer is not one");
            return;
        }

        item = NULL;

        if (redisReaderGetReply(s->reader, &item) != REDIS_OK) {
            ngx_http_ratepool_sentinel_failed(s, "its answer is not one");
            return;
        }

        if (item == NULL) {
            continue;
        }

        if (ngx_http_ratepool_sentinel_answer(s, item) != NGX_OK) {
            freeReplyObject(item);
            ngx_http_ratepool_sentinel_failed(s, "it does not know the "
                                              "master: check redis_master=");
            return;
        }

        freeReplyObject(item);
        ngx_http_ratepool_sentinel_close(s);

        s->handler(s->data, &s->master, NULL);
        return;
    }

    if (ngx_handle_read_event(rev, 0) != NGX_OK) {
        ngx_http_ratepool_sentinel_failed(s, "it closed the connection");
    }
}


/* ["ip", "port"]: the master's address (never a name: nothing resolves) */

static ngx_int_t
ngx_http_ratepool_sentinel_answer(ngx_http_ratepool_sentinel_t *s,
    redisReply *reply)
{
    u_char               *ip;
    size_t                len;
    in_addr_t             inaddr;
    ngx_int_t             port;
    struct sockaddr_in   *sin;
#if (NGX_HAVE_INET6)
    struct sockaddr_in6  *sin6;
#endif

    if (reply->type != REDIS_REPLY_ARRAY || reply->elements != 2
        || reply->element[0]->type != REDIS_REPLY_STRING
        || reply->element[1]->type != REDIS_REPLY_STRING
        || reply->element[0]->len == 0
        || reply->element[0]->len >= NGX_SOCKADDR_STRLEN
        || reply->element[1]->len == 0 || reply->element[1]->len > 5)
    {
        return NGX_ERROR;
    }

    ip = (u_char *) reply->element[0]->str;
    len = reply->element[0]->len;

    port = ngx_atoi((u_char *) reply->element[1]->str,
                    reply->element[1]->len);
    if (port < 1 || port > 65535) {
        return NGX_ERROR;
    }

    ngx_memzero(&s->sockaddr, sizeof(ngx_sockaddr_t));

    inaddr = ngx_inet_addr(ip, len);

    if (inaddr != INADDR_NONE) {
        sin = &s->sockaddr.sockaddr_in;
        sin->sin_family = AF_INET;
        sin->sin_addr.s_addr = inaddr;
        s->master.socklen = sizeof(struct sockaddr_in);

#if (NGX_HAVE_INET6)
    } else if (ngx_inet6_addr(ip, len,
                              s->sockaddr.sockaddr_in6.sin6_addr.s6_addr)
               == NGX_OK)
    {
        sin6 = &s->sockaddr.sockaddr_in6;
        sin6->sin6_family = AF_INET6;
        s->master.socklen = sizeof(struct sockaddr_in6);
#endif

    } else {
        return NGX_ERROR;
    }

    ngx_inet_set_port(&s->sockaddr.sockaddr, (in_port_t) port);
    s->master.sockaddr = &s->sockaddr.sockaddr;

    s->master.name.len = ngx_sock_ntop(s->master.sockaddr, s->master.socklen,
                                       s->name, NGX_SOCKADDR_STRLEN, 1);
    s->master.name.data = s->name;

    return NGX_OK;
}


/* the next sentinel, until each was asked once; then the caller waits */

static void
ngx_http_ratepool_sentinel_failed(ngx_http_ratepool_sentinel_t *s,
    const char *why)
{
    ngx_log_error(NGX_LOG_INFO, s->log, 0,
                  "ratepool: redis sentinel at \"%V\" cannot say where "
                  "master \"%V\" is: %s", s->peer.name, &s->conf->master,
                  why);

    ngx_http_ratepool_sentinel_close(s);

    if (s->tried < s->conf->nsentinels) {
        ngx_http_ratepool_sentinel_connect(s);
        return;
    }

    s->handler(s->data, NULL, "no sentinel could say where its master is");
}

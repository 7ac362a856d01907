
/*
 * Copyright (C) ratepool authors
 */


#ifndef _NGX_HTTP_RATEPOOL_REDIS_H_INCLUDED_
#define _NGX_HTTP_RATEPOOL_REDIS_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool.h"


/* this worker's connection to Redis: pipelined commands, a breaker */

/* called when the connection is ready (connected), and every few
   seconds after */
typedef void (*ngx_http_ratepool_redis_beat_pt)(
    ngx_http_ratepool_redis_t *redis, void *data, ngx_uint_t connected);

ngx_int_t ngx_http_ratepool_redis_init_process(ngx_cycle_t *cycle,
    ngx_http_ratepool_main_conf_t *rmcf, ngx_http_ratepool_redis_beat_pt beat,
    void *data);
void ngx_http_ratepool_redis_exit_process(
    ngx_http_ratepool_main_conf_t *rmcf);
ngx_http_ratepool_redis_t *ngx_http_ratepool_redis_get(
    ngx_http_ratepool_main_conf_t *rmcf);
ngx_int_t ngx_http_ratepool_redis_usable(ngx_http_ratepool_redis_t *redis);
ngx_http_ratepool_redis_cmd_t *ngx_http_ratepool_redis_script(
    ngx_http_ratepool_redis_t *redis, ratepool_resp_arg_t *args,
    ngx_uint_t nargs, ngx_uint_t op, ngx_http_ratepool_redis_pt handler,
    void *data);
void ngx_http_ratepool_redis_resend(ngx_http_ratepool_redis_t *redis,
    ngx_http_ratepool_redis_cmd_t *cmd, u_char op);
void ngx_http_ratepool_redis_timed_out(ngx_http_ratepool_redis_t *redis);
void ngx_http_ratepool_redis_send_now(ngx_http_ratepool_redis_t *redis);
void ngx_http_ratepool_redis_beat_later(ngx_http_ratepool_redis_t *redis);


#endif /* _NGX_HTTP_RATEPOOL_REDIS_H_INCLUDED_ */


/*
 * Copyright (C) ratepool authors
 */


#ifndef _NGX_HTTP_RATEPOOL_SENTINEL_H_INCLUDED_
#define _NGX_HTTP_RATEPOOL_SENTINEL_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool.h"


typedef struct ngx_http_ratepool_sentinel_s  ngx_http_ratepool_sentinel_t;

/* the master's address, or NULL and why not */
typedef void (*ngx_http_ratepool_sentinel_pt)(void *data, ngx_addr_t *master,
    const char *why);

ngx_http_ratepool_sentinel_t *ngx_http_ratepool_sentinel_create(
    ngx_cycle_t *cycle, ngx_http_ratepool_redis_conf_t *conf,
    ngx_http_ratepool_sentinel_pt handler, void *data);
void ngx_http_ratepool_sentinel_ask(ngx_http_ratepool_sentinel_t *s);
void ngx_http_ratepool_sentinel_close(ngx_http_ratepool_sentinel_t *s);


#endif /* _NGX_HTTP_RATEPOOL_SENTINEL_H_INCLUDED_ */

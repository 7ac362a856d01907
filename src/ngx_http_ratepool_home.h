
/*
 * Copyright (C) ratepool authors
 */


#ifndef _NGX_HTTP_RATEPOOL_HOME_H_INCLUDED_
#define _NGX_HTTP_RATEPOOL_HOME_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool.h"


/* conversations' homes in the zone; each but init with the zone locked */

void ngx_http_ratepool_home_init(ngx_http_ratepool_shctx_t *sh);

/* a live home, NULL if none (an expired one is given up) */
ngx_http_ratepool_home_t *ngx_http_ratepool_home_find(
    ngx_http_ratepool_zone_t *zone, uint64_t id, uint64_t now_ms);

/* the org that served the turn is the conversation's home from now on */
void ngx_http_ratepool_home_set(ngx_http_ratepool_zone_t *zone,
    uint64_t id, ngx_http_ratepool_org_sh_t *org, uint64_t ttl_ms,
    ratepool_turn_t *turn, uint64_t now_ms);

/* Redis's word on a home, unless this gateway knows a later one */
void ngx_http_ratepool_home_learn(ngx_http_ratepool_zone_t *zone,
    uint64_t id, ngx_http_ratepool_org_sh_t *org, uint64_t ttl_ms,
    ratepool_turn_t *turn, uint64_t now_ms);

/* a prompt's tools and system are warm in that org's cache */
void ngx_http_ratepool_home_prefix(ngx_http_ratepool_zone_t *zone,
    uint64_t id, ngx_http_ratepool_org_sh_t *org, uint64_t ttl_ms,
    uint64_t now_ms);


#endif /* _NGX_HTTP_RATEPOOL_HOME_H_INCLUDED_ */

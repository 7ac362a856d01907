
/*
 * Copyright (C) ratepool authors
 */


#ifndef _NGX_HTTP_RATEPOOL_STORE_H_INCLUDED_
#define _NGX_HTTP_RATEPOOL_STORE_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool.h"


/*
 * Where the limits are kept that several gateways share, behind one
 * table of functions (ngx_http_ratepool_store_t), chosen by
 * "ratepool_zone ... redis=": the zone alone, or Redis.
 */

extern const ngx_http_ratepool_store_t  ngx_http_ratepool_store_local;
extern const ngx_http_ratepool_store_t  ngx_http_ratepool_store_redis;


#endif /* _NGX_HTTP_RATEPOOL_STORE_H_INCLUDED_ */

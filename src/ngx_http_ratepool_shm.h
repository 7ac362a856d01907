
/*
 * Copyright (C) ratepool authors
 */


#ifndef _NGX_HTTP_RATEPOOL_SHM_H_INCLUDED_
#define _NGX_HTTP_RATEPOOL_SHM_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool.h"


ngx_int_t ngx_http_ratepool_init_zone(ngx_shm_zone_t *shm_zone, void *data);
void ngx_http_ratepool_history_count(ngx_http_ratepool_shctx_t *sh,
    ngx_uint_t what);
uint64_t ngx_http_ratepool_history_get(ngx_http_ratepool_shctx_t *sh,
    ngx_uint_t what, time_t step);
void ngx_http_ratepool_observe(ngx_http_ratepool_histogram_t *h,
    const ngx_msec_t *bounds, ngx_msec_t ms);


/* the bounds of the histograms' buckets, in ms */
extern const ngx_msec_t  ngx_http_ratepool_wait_bounds[];
extern const ngx_msec_t  ngx_http_ratepool_added_bounds[];


#endif /* _NGX_HTTP_RATEPOOL_SHM_H_INCLUDED_ */

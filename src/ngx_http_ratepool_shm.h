
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


#endif /* _NGX_HTTP_RATEPOOL_SHM_H_INCLUDED_ */


/*
 * Copyright (C) ratepool authors
 */


#ifndef _NGX_HTTP_RATEPOOL_BALANCER_H_INCLUDED_
#define _NGX_HTTP_RATEPOOL_BALANCER_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool.h"


char *ngx_http_ratepool_upstream(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
ngx_int_t ngx_http_ratepool_check_keepalive(ngx_conf_t *cf,
    ngx_http_ratepool_pool_t *pool);


#endif /* _NGX_HTTP_RATEPOOL_BALANCER_H_INCLUDED_ */

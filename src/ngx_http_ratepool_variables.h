
/*
 * Copyright (C) ratepool authors
 */


#ifndef _NGX_HTTP_RATEPOOL_VARIABLES_H_INCLUDED_
#define _NGX_HTTP_RATEPOOL_VARIABLES_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool.h"


/* preconfiguration: $ratepool_upstream_*, $ratepool_key, ... */
ngx_int_t ngx_http_ratepool_add_variables(ngx_conf_t *cf);


#endif /* _NGX_HTTP_RATEPOOL_VARIABLES_H_INCLUDED_ */

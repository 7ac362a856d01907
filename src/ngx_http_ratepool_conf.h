
/*
 * Copyright (C) ratepool authors
 */


#ifndef _NGX_HTTP_RATEPOOL_CONF_H_INCLUDED_
#define _NGX_HTTP_RATEPOOL_CONF_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool.h"


/* the directives' parsers, for the module's table of commands */

char *ngx_http_ratepool_zone(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
#if (NGX_HTTP_SSL)
ngx_ssl_t *ngx_http_ratepool_tls_client(ngx_conf_t *cf, ngx_str_t *ca,
    ngx_str_t *cert, ngx_str_t *key);
#endif
char *ngx_http_ratepool_org(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
char *ngx_http_ratepool_key(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
char *ngx_http_ratepool_model(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
char *ngx_http_ratepool_price(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
char *ngx_http_ratepool_bedrock_betas(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
char *ngx_http_ratepool_workspace(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
char *ngx_http_ratepool_client(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
char *ngx_http_ratepool_pass(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
char *ngx_http_ratepool_status(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);


#endif /* _NGX_HTTP_RATEPOOL_CONF_H_INCLUDED_ */


/*
 * Copyright (C) ratepool authors
 */


#ifndef _NGX_HTTP_RATEPOOL_ADMISSION_H_INCLUDED_
#define _NGX_HTTP_RATEPOOL_ADMISSION_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool.h"
#include "ngx_http_ratepool_wait.h"


/* NGX_DECLINED: on with the phases; NGX_DONE: it waits; else a status */
ngx_int_t ngx_http_ratepool_admit(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx);
ngx_int_t ngx_http_ratepool_admit_redirected(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx);
ngx_uint_t ngx_http_ratepool_may_requeue(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx);
ngx_int_t ngx_http_ratepool_requeue(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx);
void ngx_http_ratepool_proceed(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx, ngx_int_t rc);

ngx_int_t ngx_http_ratepool_check_budgets(ngx_http_request_t *r,
    ngx_http_ratepool_pool_t *pool, ngx_http_ratepool_workspace_t *ws);
void ngx_http_ratepool_refund_workspace(ngx_http_ratepool_ctx_t *ctx,
    ngx_uint_t request);

extern const ngx_http_ratepool_wait_hooks_t  ngx_http_ratepool_admission_hooks;


#endif /* _NGX_HTTP_RATEPOOL_ADMISSION_H_INCLUDED_ */

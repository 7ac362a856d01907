
/*
 * Copyright (C) ratepool authors
 */


#ifndef _NGX_HTTP_RATEPOOL_REPLY_H_INCLUDED_
#define _NGX_HTTP_RATEPOOL_REPLY_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool.h"


/* the gateway's own answers, in the error format of the client's API */

ngx_uint_t ngx_http_ratepool_dialect(ngx_http_request_t *r);

/* each finalizes the request and returns NGX_DONE, or an error status */
ngx_int_t ngx_http_ratepool_reply_error(ngx_http_request_t *r,
    ngx_uint_t status, const char *type, ngx_str_t *message,
    const char *error_code, ngx_uint_t retry_after_sec,
    ngx_int_t should_retry);
ngx_int_t ngx_http_ratepool_reply_bad_token(ngx_http_request_t *r);
ngx_int_t ngx_http_ratepool_reply_store_down(ngx_http_request_t *r);
ngx_int_t ngx_http_ratepool_reply_too_big(ngx_http_request_t *r,
    ngx_http_ratepool_workspace_t *ws, uint64_t input_cost,
    ngx_uint_t limit);
ngx_int_t ngx_http_ratepool_reply_spent(ngx_http_request_t *r,
    ngx_http_ratepool_pool_t *pool, time_t until);
u_char *ngx_http_ratepool_amount(u_char *p, u_char *last, uint64_t amount,
    ngx_uint_t money);
ngx_int_t ngx_http_ratepool_reply_over_budget(ngx_http_request_t *r,
    ngx_http_ratepool_workspace_t *ws, const char *period, uint64_t budget,
    ngx_uint_t money, time_t reset);
ngx_int_t ngx_http_ratepool_reply_no_key(ngx_http_request_t *r,
    ngx_http_ratepool_pool_t *pool);
ngx_int_t ngx_http_ratepool_reply_pool_full(ngx_http_request_t *r,
    ngx_http_ratepool_pool_t *pool, uint64_t wait_ms);
ngx_int_t ngx_http_ratepool_reply_budget_busy(ngx_http_request_t *r,
    ngx_http_ratepool_workspace_t *ws, const char *kind, uint64_t budget,
    ngx_uint_t money, uint64_t wait_ms);
ngx_int_t ngx_http_ratepool_reply_workspace_full(ngx_http_request_t *r,
    ngx_http_ratepool_workspace_t *ws, const char *what, ngx_uint_t limit,
    uint64_t wait_ms);

/* in a header filter: the headers set, ctx->own_error the body */
ngx_int_t ngx_http_ratepool_reply_replace(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx);
void ngx_http_ratepool_hide_headers(ngx_http_request_t *r, ngx_str_t *name,
    ngx_uint_t prefix);
ngx_int_t ngx_http_ratepool_reply_cloud_error(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx);
ngx_int_t ngx_http_ratepool_reply_retry_after(ngx_http_request_t *r,
    uint64_t wait_ms);

ngx_int_t ngx_http_ratepool_send_json(ngx_http_request_t *r,
    ngx_uint_t status, ngx_buf_t *b);
ngx_int_t ngx_http_ratepool_send_buf(ngx_http_request_t *r, ngx_buf_t *b);


#endif /* _NGX_HTTP_RATEPOOL_REPLY_H_INCLUDED_ */

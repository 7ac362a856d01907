
/*
 * Copyright (C) ratepool authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool_module.h"


static ngx_int_t ngx_http_ratepool_header_filter(ngx_http_request_t *r);


static ngx_http_output_header_filter_pt  ngx_http_next_header_filter;


/*
 * A provider's 429 that reaches the client (no other key could take the
 * request) carries that one key's retry-after; the client is told
 * instead when the first key of the whole pool frees up.
 */

static ngx_int_t
ngx_http_ratepool_header_filter(ngx_http_request_t *r)
{
    u_char                   *p;
    size_t                    len;
    uint64_t                  now_ms, wait_ms;
    ngx_http_ratepool_ctx_t  *ctx;

    static ngx_str_t  retry_after = ngx_string("retry-after");
    static ngx_str_t  should_retry = ngx_string("x-should-retry");

    if (r != r->main) {
        return ngx_http_next_header_filter(r);
    }

    ctx = ngx_http_get_module_ctx(r, ngx_http_ratepool_module);

    if (ctx == NULL || !ctx->exhausted
        || r->headers_out.status != NGX_HTTP_TOO_MANY_REQUESTS)
    {
        return ngx_http_next_header_filter(r);
    }

    now_ms = ngx_http_ratepool_now_ms();
    wait_ms = ctx->soonest_ms > now_ms ? ctx->soonest_ms - now_ms : 0;

    p = ngx_pnalloc(r->pool, NGX_INT_T_LEN);
    if (p == NULL) {
        return NGX_ERROR;
    }

    len = ngx_sprintf(p, "%ui",
                      (ngx_uint_t) ratepool_retry_after_sec(wait_ms,
                                                    (uint32_t) ngx_random()))
          - p;

    if (ngx_http_ratepool_set_header(r, &retry_after, p, len) != NGX_OK
        || ngx_http_ratepool_set_header(r, &should_retry,
                                        (u_char *) "true", 4)
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    return ngx_http_next_header_filter(r);
}


/* sets a response header, replacing one of the same name */

ngx_int_t
ngx_http_ratepool_set_header(ngx_http_request_t *r, ngx_str_t *name,
    u_char *value, size_t len)
{
    ngx_uint_t        i;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    part = &r->headers_out.headers.part;
    h = part->elts;

    for (i = 0; /* void */; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (h[i].hash != 0 && h[i].key.len == name->len
            && ngx_strncasecmp(h[i].key.data, name->data, name->len) == 0)
        {
            h[i].value.data = value;
            h[i].value.len = len;
            return NGX_OK;
        }
    }

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    h->key = *name;
    h->value.data = value;
    h->value.len = len;

    return NGX_OK;
}


ngx_int_t
ngx_http_ratepool_filter_init(ngx_conf_t *cf)
{
    ngx_http_next_header_filter = ngx_http_top_header_filter;
    ngx_http_top_header_filter = ngx_http_ratepool_header_filter;

    return NGX_OK;
}


/*
 * Copyright (C) ratepool authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool.h"
#include "ngx_http_ratepool_access.h"
#include "ngx_http_ratepool_body.h"
#include "ngx_http_ratepool_variables.h"


/*
 * The module's variables: what the chosen key sends upstream (used by
 * the proxy set-up ratepool_pass makes) and what a request did, for
 * access logs.
 */


static ngx_int_t ngx_http_ratepool_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_ratepool_tries_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_ratepool_usage_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_ratepool_session_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_ratepool_left_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);

#define RATEPOOL_SESSION_MAX           64


#define RATEPOOL_VAR_UPSTREAM_HOST     0
#define RATEPOOL_VAR_X_API_KEY         1
#define RATEPOOL_VAR_AUTHORIZATION     2
#define RATEPOOL_VAR_KEY               3
#define RATEPOOL_VAR_WORKSPACE         4
#define RATEPOOL_VAR_API_KEY           5
#define RATEPOOL_VAR_CONVERSATION      6
#define RATEPOOL_VAR_AMZ_DATE          7
#define RATEPOOL_VAR_AMZ_TOKEN         8
#define RATEPOOL_VAR_CLIENT            9


static ngx_http_variable_t  ngx_http_ratepool_vars[] = {

    /* what the chosen key sends upstream; changes with every try */

    { ngx_string("ratepool_upstream_host"), NULL,
      ngx_http_ratepool_variable, RATEPOOL_VAR_UPSTREAM_HOST,
      NGX_HTTP_VAR_NOCACHEABLE|NGX_HTTP_VAR_NOHASH, 0 },

    { ngx_string("ratepool_upstream_x_api_key"), NULL,
      ngx_http_ratepool_variable, RATEPOOL_VAR_X_API_KEY,
      NGX_HTTP_VAR_NOCACHEABLE|NGX_HTTP_VAR_NOHASH, 0 },

    { ngx_string("ratepool_upstream_authorization"), NULL,
      ngx_http_ratepool_variable, RATEPOOL_VAR_AUTHORIZATION,
      NGX_HTTP_VAR_NOCACHEABLE|NGX_HTTP_VAR_NOHASH, 0 },

    { ngx_string("ratepool_upstream_api_key"), NULL,
      ngx_http_ratepool_variable, RATEPOOL_VAR_API_KEY,
      NGX_HTTP_VAR_NOCACHEABLE|NGX_HTTP_VAR_NOHASH, 0 },

    /* AWS's signature of the try (SigV4), with what it signed */

    { ngx_string("ratepool_upstream_amz_date"), NULL,
      ngx_http_ratepool_variable, RATEPOOL_VAR_AMZ_DATE,
      NGX_HTTP_VAR_NOCACHEABLE|NGX_HTTP_VAR_NOHASH, 0 },

    { ngx_string("ratepool_upstream_amz_token"), NULL,
      ngx_http_ratepool_variable, RATEPOOL_VAR_AMZ_TOKEN,
      NGX_HTTP_VAR_NOCACHEABLE|NGX_HTTP_VAR_NOHASH, 0 },

    /* for access logs */

    { ngx_string("ratepool_key"), NULL,
      ngx_http_ratepool_variable, RATEPOOL_VAR_KEY,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("ratepool_workspace"), NULL,
      ngx_http_ratepool_variable, RATEPOOL_VAR_WORKSPACE,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("ratepool_client"), NULL,
      ngx_http_ratepool_variable, RATEPOOL_VAR_CLIENT,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("ratepool_session"), NULL,
      ngx_http_ratepool_session_variable, 0, 0, 0 },

    { ngx_string("ratepool_client_left"), NULL,
      ngx_http_ratepool_left_variable, 0,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("ratepool_conversation"), NULL,
      ngx_http_ratepool_variable, RATEPOOL_VAR_CONVERSATION,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("ratepool_tries"), NULL,
      ngx_http_ratepool_tries_variable, 0,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("ratepool_wait_ms"), NULL,
      ngx_http_ratepool_tries_variable, 1,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    /* as the provider reported them, read from its answer */

    { ngx_string("ratepool_input_tokens"), NULL,
      ngx_http_ratepool_usage_variable, RATEPOOL_USAGE_INPUT,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("ratepool_output_tokens"), NULL,
      ngx_http_ratepool_usage_variable, RATEPOOL_USAGE_OUTPUT,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("ratepool_cache_read_tokens"), NULL,
      ngx_http_ratepool_usage_variable, RATEPOOL_USAGE_CACHE_READ,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("ratepool_cache_creation_tokens"), NULL,
      ngx_http_ratepool_usage_variable, RATEPOOL_USAGE_CACHE_CREATION,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

      ngx_http_null_variable
};


static ngx_int_t
ngx_http_ratepool_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_str_t                 *s, amz_date;
    ngx_uint_t                 signed_key;
    ngx_http_ratepool_ctx_t   *ctx;

    static ngx_str_t  placements[] = {
        ngx_null_string,
        ngx_string("new"),
        ngx_string("home"),
        ngx_string("moved")
    };

    ctx = ngx_http_ratepool_get_ctx(r);

    s = NULL;

    if (ctx != NULL) {

        switch (data) {

        case RATEPOOL_VAR_WORKSPACE:
            s = ctx->workspace ? &ctx->workspace->name : NULL;
            break;

        case RATEPOOL_VAR_CLIENT:
            s = ctx->client ? &ctx->client->name : NULL;
            break;

        case RATEPOOL_VAR_CONVERSATION:
            /* "new", "home" or "moved", once a key was chosen */
            s = ctx->key ? &placements[ctx->placement] : NULL;
            break;

        default:
            if (ctx->key == NULL) {
                break;
            }

            signed_key = (ctx->key->credential == RATEPOOL_CREDENTIAL_SIGV4);

            if (data == RATEPOOL_VAR_UPSTREAM_HOST) {
                s = &ctx->key->host;

            } else if (data == RATEPOOL_VAR_X_API_KEY) {
                s = &ctx->key->x_api_key;

            } else if (data == RATEPOOL_VAR_AUTHORIZATION) {
                /* what the try was signed with, or the token it carries */
                s = (signed_key
                     || ctx->key->credential == RATEPOOL_CREDENTIAL_GOOGLE)
                    ? &ctx->signed_auth : &ctx->key->authorization;

            } else if (data == RATEPOOL_VAR_AMZ_DATE) {
                amz_date.data = ctx->amz_date;
                amz_date.len = signed_key ? RATEPOOL_AMZ_DATE_LEN : 0;
                s = &amz_date;

            } else if (data == RATEPOOL_VAR_AMZ_TOKEN) {
                s = signed_key ? &ctx->key->aws_token : NULL;

            } else if (data == RATEPOOL_VAR_API_KEY) {
                s = &ctx->key->api_key;

            } else {
                s = &ctx->key->name;
            }
        }
    }

    if (s == NULL || s->len == 0) {
        v->not_found = 1;
        return NGX_OK;
    }

    v->len = s->len;
    v->valid = 1;
    v->no_cacheable = 1;
    v->not_found = 0;
    v->data = s->data;

    return NGX_OK;
}


static ngx_int_t
ngx_http_ratepool_tries_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    u_char                   *p;
    ngx_http_ratepool_ctx_t  *ctx;

    ctx = ngx_http_ratepool_get_ctx(r);

    if (ctx == NULL) {
        v->not_found = 1;
        return NGX_OK;
    }

    p = ngx_pnalloc(r->pool, NGX_INT_T_LEN);
    if (p == NULL) {
        return NGX_ERROR;
    }

    /* data 1: how long the request waited for room, in ms */
    v->len = ngx_sprintf(p, "%uL", data ? ctx->waited_ms
                                        : (uint64_t) ctx->tries)
             - p;
    v->valid = 1;
    v->no_cacheable = 1;
    v->not_found = 0;
    v->data = p;

    return NGX_OK;
}


static ngx_int_t
ngx_http_ratepool_usage_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    u_char                   *p;
    uint64_t                  n;
    ratepool_usage_t         *u;
    ngx_http_ratepool_ctx_t  *ctx;

    ctx = ngx_http_ratepool_get_ctx(r);

    if (ctx == NULL || ctx->usage == NULL
        || !(ctx->usage->usage.seen & data))
    {
        v->not_found = 1;
        return NGX_OK;
    }

    u = &ctx->usage->usage;

    switch (data) {
    case RATEPOOL_USAGE_INPUT:
        n = u->input_tokens;
        break;
    case RATEPOOL_USAGE_OUTPUT:
        n = u->output_tokens;
        break;
    case RATEPOOL_USAGE_CACHE_READ:
        n = u->cache_read_input_tokens;
        break;
    default:
        n = u->cache_creation_input_tokens;
    }

    p = ngx_pnalloc(r->pool, NGX_INT64_LEN);
    if (p == NULL) {
        return NGX_ERROR;
    }

    v->len = ngx_sprintf(p, "%uL", n) - p;
    v->valid = 1;
    v->no_cacheable = 1;
    v->not_found = 0;
    v->data = p;

    return NGX_OK;
}


/*
 * Claude Code's session id (x-claude-code-session-id), for access logs:
 * only as a plain id, so that a client cannot write into the log.
 */

static ngx_int_t
ngx_http_ratepool_session_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    u_char      c;
    size_t      i;
    ngx_str_t  *id;

    static ngx_str_t  name = ngx_string("x-claude-code-session-id");

    v->not_found = 1;

    id = ngx_http_ratepool_header_in(r, &name);

    if (id == NULL || id->len > RATEPOOL_SESSION_MAX) {
        return NGX_OK;
    }

    for (i = 0; i < id->len; i++) {
        c = id->data[i];

        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
              || (c >= '0' && c <= '9') || c == '-' || c == '_'))
        {
            return NGX_OK;
        }
    }

    v->len = id->len;
    v->valid = 1;
    v->no_cacheable = 0;
    v->not_found = 0;
    v->data = id->data;

    return NGX_OK;
}


/*
 * "1" when the client went before the whole answer was sent to it (its
 * $status may still be the 200 it was sent first), else "0".
 */

static ngx_int_t
ngx_http_ratepool_left_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_http_ratepool_ctx_t  *ctx;

    ctx = ngx_http_ratepool_get_ctx(r);

    if (ctx == NULL) {
        v->not_found = 1;
        return NGX_OK;
    }

    v->len = 1;
    v->valid = 1;
    v->no_cacheable = 1;
    v->not_found = 0;
    v->data = (u_char *) ((r->connection->error || r->connection->timedout)
                          ? "1" : "0");

    return NGX_OK;
}


ngx_int_t
ngx_http_ratepool_add_variables(ngx_conf_t *cf)
{
    ngx_http_variable_t  *var, *v;

    for (v = ngx_http_ratepool_vars; v->name.len; v++) {
        var = ngx_http_add_variable(cf, &v->name, v->flags);
        if (var == NULL) {
            return NGX_ERROR;
        }

        var->get_handler = v->get_handler;
        var->data = v->data;
    }

    return NGX_OK;
}

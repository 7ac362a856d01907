
/*
 * Copyright (C) ratepool authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <openssl/crypto.h>

#include "ngx_http_ratepool.h"
#include "ngx_http_ratepool_access.h"
#include "ngx_http_ratepool_admission.h"
#include "ngx_http_ratepool_pool.h"
#include "ngx_http_ratepool_reply.h"
#include "ngx_http_ratepool_shm.h"
#include "ngx_http_ratepool_store.h"
#include "ngx_http_ratepool_wait.h"


/*
 * The access phase: who the client is (its gateway token, compared in
 * constant time, names its workspace), the request's context and what
 * it holds however it ends, then the body is read and admission runs.
 */


static ngx_http_ratepool_client_t *ngx_http_ratepool_identify(
    ngx_http_request_t *r, ngx_http_ratepool_main_conf_t *rmcf);
static ngx_int_t ngx_http_ratepool_token_matches(
    ngx_http_ratepool_main_conf_t *rmcf, u_char *token, size_t len,
    ngx_uint_t *index);
static void ngx_http_ratepool_body_read(ngx_http_request_t *r);
static void ngx_http_ratepool_cleanup(void *data);


ngx_int_t
ngx_http_ratepool_access_handler(ngx_http_request_t *r)
{
    ngx_int_t                       rc;
    ngx_pool_cleanup_t             *cln;
    ngx_http_ratepool_ctx_t        *ctx;
    ngx_http_ratepool_pool_t       *pool;
    ngx_http_ratepool_client_t     *client;
    ngx_http_ratepool_loc_conf_t   *rlcf;
    ngx_http_ratepool_main_conf_t  *rmcf;
    ngx_http_ratepool_workspace_t  *ws;

    rlcf = ngx_http_get_module_loc_conf(r, ngx_http_ratepool_module);

    if (rlcf->pool == NULL || r != r->main) {
        return NGX_DECLINED;
    }

    pool = rlcf->pool;
    ctx = ngx_http_ratepool_get_ctx(r);

    if (ctx) {
        /*
         * The phase runs again once the body is read, and after an
         * internal redirect, when the workspace was charged already.  A
         * redirect to another pool gives back what the first one held
         * and starts afresh in the new one.
         */

        if (ctx->phase_rc != NGX_DECLINED) {
            /*
             * An error page of a request that was never admitted (its
             * body could not be read, say): no key is chosen for it.
             */
            ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                          "ratepool: a request that was not admitted was "
                          "redirected to a pool");
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        if (ctx->pool == pool) {
            return NGX_DECLINED;
        }

        ngx_http_ratepool_release(ctx, &ctx->held, 0);
        ngx_http_ratepool_release(ctx, &ctx->next, 0);

        ctx->pool = pool;
        ctx->key = NULL;
        ctx->tried = 0;
        ctx->tries = 0;
        ctx->round_tries = 0;
        ctx->redirected = 1;
        ctx->retry_same = 0;
        ctx->moved_status = 0;
        ctx->answered = 0;
        ctx->exhausted = 0;
        ctx->refused = 0;
        ctx->spent = 0;
        ctx->overloaded = 0;
        ctx->too_large = 0;
        ctx->soonest_ms = 0;

        if (ngx_http_ratepool_resolve_classes(ctx) != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        return ngx_http_ratepool_admit_redirected(r, ctx);
    }

    rmcf = ngx_http_get_module_main_conf(r, ngx_http_ratepool_module);

    (void) ngx_atomic_fetch_add(&pool->zone->sh->requests, 1);
    ngx_http_ratepool_history_count(pool->zone->sh, RATEPOOL_HISTORY_REQUESTS);

    client = ngx_http_ratepool_identify(r, rmcf);

    if (client == NULL) {
        (void) ngx_atomic_fetch_add(&pool->zone->sh->rejected_auth, 1);
        return ngx_http_ratepool_reply_bad_token(r);
    }

    (void) ngx_atomic_fetch_add(&client->sh->requests, 1);
    ws = &((ngx_http_ratepool_workspace_t *) rmcf->workspaces.elts)
                                                          [client->workspace];

    ctx = ngx_pcalloc(r->pool, sizeof(ngx_http_ratepool_ctx_t));
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->request = r;
    ctx->dialect = ngx_http_ratepool_dialect(r);
    ctx->pool = pool;
    ctx->workspace = ws;
    ctx->client = client;
    ctx->phase_rc = NGX_DONE;
    ctx->arrived_ms = ngx_http_ratepool_now_ms();

    /* whatever this request holds is given back however it ends */
    cln = ngx_pool_cleanup_add(r->pool, 0);
    if (cln == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    cln->handler = ngx_http_ratepool_cleanup;
    cln->data = ctx;

    ngx_http_set_ctx(r, ctx, ngx_http_ratepool_module);

    if (ngx_http_ratepool_has_budget(ws)) {
        rc = ngx_http_ratepool_check_budgets(r, pool, ws);

        if (rc != NGX_OK) {
            /* NGX_DONE: answered; else the body could not be discarded */
            return rc;
        }
    }

    /*
     * The cost of a request is in its body: read it first, as the mirror
     * module does, and go on with the phases once it is in.
     */

    rc = ngx_http_read_client_request_body(r, ngx_http_ratepool_body_read);

    if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
        return rc;
    }

    ngx_http_finalize_request(r, NGX_DONE);

    return NGX_DONE;
}


static void
ngx_http_ratepool_body_read(ngx_http_request_t *r)
{
    ngx_http_ratepool_ctx_t  *ctx;

    ctx = ngx_http_ratepool_get_ctx(r);
    ctx->body_read_ms = ngx_http_ratepool_now_ms();

    ngx_http_ratepool_proceed(r, ctx, ngx_http_ratepool_admit(r, ctx));
}


/*
 * An internal redirect (error_page, a named location) wipes the module
 * contexts; the request's context is found again through the cleanup
 * that owns it, as the realip module does.
 */

ngx_http_ratepool_ctx_t *
ngx_http_ratepool_get_ctx(ngx_http_request_t *r)
{
    ngx_pool_cleanup_t       *cln;
    ngx_http_ratepool_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_ratepool_module);

    if (ctx || !(r->internal || r->filter_finalize)) {
        return ctx;
    }

    for (cln = r->pool->cleanup; cln; cln = cln->next) {
        if (cln->handler == ngx_http_ratepool_cleanup) {
            ctx = cln->data;
            ngx_http_set_ctx(r, ctx, ngx_http_ratepool_module);
            break;
        }
    }

    return ctx;
}


static ngx_int_t
ngx_http_ratepool_token_matches(ngx_http_ratepool_main_conf_t *rmcf,
    u_char *token, size_t len, ngx_uint_t *index)
{
    u_char                       digest[32];
    ngx_uint_t                   i, found;
    unsigned int                 n;
    ngx_http_ratepool_client_t  *client;

    if (len == 0) {
        return 0;
    }

    if (EVP_DigestInit_ex(rmcf->sha256_ctx, rmcf->sha256, NULL) != 1
        || EVP_DigestUpdate(rmcf->sha256_ctx, token, len) != 1
        || EVP_DigestFinal_ex(rmcf->sha256_ctx, digest, &n) != 1)
    {
        return 0;
    }

    found = 0;
    client = rmcf->clients.elts;

    /* every entry is compared, in constant time, whatever matches */
    for (i = 0; i < rmcf->clients.nelts; i++) {
        if (CRYPTO_memcmp(digest, client[i].digest, 32) == 0 && !found) {
            *index = i;
            found = 1;
        }
    }

    return found;
}


static ngx_http_ratepool_client_t *
ngx_http_ratepool_identify(ngx_http_request_t *r,
    ngx_http_ratepool_main_conf_t *rmcf)
{
    ngx_str_t                       *auth;
    ngx_uint_t                       i, index;
    ngx_list_part_t                 *part;
    ngx_table_elt_t                 *h;
    ngx_http_ratepool_client_t      *client;

    client = rmcf->clients.elts;

    part = &r->headers_in.headers.part;
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

        /* x-api-key, or api-key as Azure OpenAI's clients send it */

        if (((h[i].key.len == sizeof("x-api-key") - 1
              && ngx_strncasecmp(h[i].key.data, (u_char *) "x-api-key",
                                 sizeof("x-api-key") - 1) == 0)
             || (h[i].key.len == sizeof("api-key") - 1
                 && ngx_strncasecmp(h[i].key.data, (u_char *) "api-key",
                                    sizeof("api-key") - 1) == 0))
            && ngx_http_ratepool_token_matches(rmcf, h[i].value.data,
                                               h[i].value.len, &index))
        {
            return &client[index];
        }
    }

    if (r->headers_in.authorization == NULL) {
        return NULL;
    }

    auth = &r->headers_in.authorization->value;

    if (auth->len > sizeof("Bearer ") - 1
        && ngx_strncasecmp(auth->data, (u_char *) "Bearer ",
                           sizeof("Bearer ") - 1) == 0
        && ngx_http_ratepool_token_matches(rmcf,
                                           auth->data + sizeof("Bearer ") - 1,
                                           auth->len - (sizeof("Bearer ") - 1),
                                           &index))
    {
        return &client[index];
    }

    return NULL;
}


static void
ngx_http_ratepool_cleanup(void *data)
{
    ngx_http_ratepool_ctx_t  *ctx = data;

    ngx_http_ratepool_unwait(ctx);
    ngx_http_ratepool_unclaim(ctx);
    ctx->pool->zone->store->end(ctx);
    ngx_http_ratepool_release(ctx, &ctx->held, 0);
    ngx_http_ratepool_release(ctx, &ctx->next, 0);
    ngx_http_ratepool_refund_workspace(ctx, 0);
}


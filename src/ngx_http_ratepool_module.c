
/*
 * Copyright (C) ratepool authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool.h"
#include "ngx_http_ratepool_access.h"
#include "ngx_http_ratepool_admission.h"
#include "ngx_http_ratepool_balancer.h"
#include "ngx_http_ratepool_conf.h"
#include "ngx_http_ratepool_token.h"
#include "ngx_http_ratepool_filter.h"
#include "ngx_http_ratepool_redis.h"
#include "ngx_http_ratepool_shm.h"
#include "ngx_http_ratepool_status.h"
#include "ngx_http_ratepool_store.h"
#include "ngx_http_ratepool_variables.h"
#include "ngx_http_ratepool_wait.h"


/*
 * The module: its directives and contexts, the configuration's create,
 * merge and init (with the checks across directives that "nginx -t"
 * makes), postconfiguration, and the worker's start and exit.  The
 * directives' parsers are in ngx_http_ratepool_conf.c.
 */



static void *ngx_http_ratepool_create_main_conf(ngx_conf_t *cf);
static char *ngx_http_ratepool_init_main_conf(ngx_conf_t *cf, void *conf);
static ngx_int_t ngx_http_ratepool_check_pools(ngx_conf_t *cf,
    ngx_http_ratepool_main_conf_t *rmcf);
static ngx_int_t ngx_http_ratepool_check_token_limits(ngx_conf_t *cf,
    ngx_http_ratepool_pool_t *pool);
static ngx_int_t ngx_http_ratepool_check_key_names(ngx_conf_t *cf,
    ngx_http_ratepool_pool_t *p, ngx_http_ratepool_pool_t *q);
static ngx_int_t ngx_http_ratepool_check_org_names(ngx_conf_t *cf,
    ngx_http_ratepool_pool_t *p, ngx_http_ratepool_pool_t *q);
static void ngx_http_ratepool_free_sha256(void *data);
static void *ngx_http_ratepool_create_srv_conf(ngx_conf_t *cf);
static void *ngx_http_ratepool_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_ratepool_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child);
static ngx_int_t ngx_http_ratepool_init_process(ngx_cycle_t *cycle);
static void ngx_http_ratepool_log_summary(ngx_cycle_t *cycle,
    ngx_http_ratepool_main_conf_t *rmcf);
static void ngx_http_ratepool_exit_process(ngx_cycle_t *cycle);
static ngx_int_t ngx_http_ratepool_check_cleartext(ngx_conf_t *cf,
    ngx_http_ratepool_loc_conf_t *pass, ngx_http_ratepool_pool_t *pool);
static ngx_int_t ngx_http_ratepool_link_passes(ngx_conf_t *cf,
    ngx_http_ratepool_main_conf_t *rmcf);
static ngx_int_t ngx_http_ratepool_init(ngx_conf_t *cf);


static ngx_conf_num_bounds_t  ngx_http_ratepool_output_reserve_bounds = {
    ngx_conf_check_num_bounds, 1, 1000000
};


static ngx_command_t  ngx_http_ratepool_commands[] = {

    { ngx_string("ratepool_zone"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_1MORE,
      ngx_http_ratepool_zone,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("ratepool"),
      NGX_HTTP_UPS_CONF|NGX_CONF_1MORE,
      ngx_http_ratepool_upstream,
      NGX_HTTP_SRV_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("ratepool_org"),
      NGX_HTTP_UPS_CONF|NGX_CONF_1MORE,
      ngx_http_ratepool_org,
      NGX_HTTP_SRV_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("ratepool_key"),
      NGX_HTTP_UPS_CONF|NGX_CONF_2MORE,
      ngx_http_ratepool_key,
      NGX_HTTP_SRV_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("ratepool_workspace"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_1MORE,
      ngx_http_ratepool_workspace,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("ratepool_client"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE23,
      ngx_http_ratepool_client,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("ratepool_model"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_2MORE,
      ngx_http_ratepool_model,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("ratepool_price"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_2MORE,
      ngx_http_ratepool_price,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("ratepool_bedrock_betas"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_1MORE,
      ngx_http_ratepool_bedrock_betas,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("ratepool_pass"),
      NGX_HTTP_LOC_CONF|NGX_CONF_TAKE12,
      ngx_http_ratepool_pass,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("ratepool_output_reserve"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_ratepool_loc_conf_t, output_reserve),
      &ngx_http_ratepool_output_reserve_bounds },

    { ngx_string("ratepool_wait"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_ratepool_loc_conf_t, wait),
      NULL },

    { ngx_string("ratepool_status"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_ratepool_status,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_ratepool_module_ctx = {
    ngx_http_ratepool_add_variables,       /* preconfiguration */
    ngx_http_ratepool_init,                /* postconfiguration */

    ngx_http_ratepool_create_main_conf,    /* create main configuration */
    ngx_http_ratepool_init_main_conf,      /* init main configuration */

    ngx_http_ratepool_create_srv_conf,     /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_ratepool_create_loc_conf,     /* create location configuration */
    ngx_http_ratepool_merge_loc_conf       /* merge location configuration */
};


ngx_module_t  ngx_http_ratepool_module = {
    NGX_MODULE_V1,
    &ngx_http_ratepool_module_ctx,         /* module context */
    ngx_http_ratepool_commands,            /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    ngx_http_ratepool_init_process,        /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_http_ratepool_exit_process,        /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};





static void *
ngx_http_ratepool_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_ratepool_main_conf_t  *rmcf;

    rmcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_ratepool_main_conf_t));
    if (rmcf == NULL) {
        return NULL;
    }

    if (ngx_array_init(&rmcf->pools, cf->pool, 2,
                       sizeof(ngx_http_ratepool_pool_t *))
        != NGX_OK
        || ngx_array_init(&rmcf->workspaces, cf->pool, 4,
                          sizeof(ngx_http_ratepool_workspace_t))
           != NGX_OK
        || ngx_array_init(&rmcf->clients, cf->pool, 4,
                          sizeof(ngx_http_ratepool_client_t))
           != NGX_OK
        || ngx_array_init(&rmcf->passes, cf->pool, 2,
                          sizeof(ngx_http_ratepool_loc_conf_t *))
           != NGX_OK
        || ngx_array_init(&rmcf->models, cf->pool, 4,
                          sizeof(ngx_http_ratepool_model_t))
           != NGX_OK
        || ngx_array_init(&rmcf->prices, cf->pool, 8,
                          sizeof(ngx_http_ratepool_price_t))
           != NGX_OK
        || ngx_array_init(&rmcf->bedrock_betas, cf->pool, 4,
                          sizeof(ngx_str_t))
           != NGX_OK)
    {
        return NULL;
    }

    return rmcf;
}


/*
 * State is found by name: a key name must stand for one credential of
 * one org, and an org name for one set of limits, in every pool.
 */

static ngx_int_t
ngx_http_ratepool_check_pools(ngx_conf_t *cf,
    ngx_http_ratepool_main_conf_t *rmcf)
{
    ngx_uint_t                  i, j;
    ngx_http_ratepool_pool_t  **pools;

    pools = rmcf->pools.elts;

    for (i = 0; i < rmcf->pools.nelts; i++) {
        if (pools[i]->keys
            && ngx_http_ratepool_check_token_limits(cf, pools[i]) != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    for (i = 0; i < rmcf->pools.nelts; i++) {
        for (j = i + 1; j < rmcf->pools.nelts; j++) {

            if (pools[i]->keys == NULL || pools[j]->keys == NULL) {
                continue;
            }

            if (ngx_http_ratepool_check_key_names(cf, pools[i], pools[j])
                != NGX_OK
                || ngx_http_ratepool_check_org_names(cf, pools[i], pools[j])
                   != NGX_OK)
            {
                return NGX_ERROR;
            }
        }
    }

    return NGX_OK;
}


/*
 * OpenAI counts input and output tokens against one limit: the orgs of
 * keys that speak its API, and orgs given "tpm=", have one token bucket.
 */

static ngx_int_t
ngx_http_ratepool_check_token_limits(ngx_conf_t *cf,
    ngx_http_ratepool_pool_t *pool)
{
    ngx_uint_t                i, j, dialect;
    ngx_http_ratepool_org_t  *orgs;
    ngx_http_ratepool_key_t  *keys;

    orgs = pool->orgs->elts;
    keys = pool->keys->elts;

    for (i = 0; i < pool->orgs->nelts; i++) {
        if (orgs[i].tpm) {
            orgs[orgs[i].base].combined = 1;
        }
    }

    for (i = 0; i < pool->keys->nelts; i++) {
        dialect = keys[i].dialect;

        for (j = 0; j < i; j++) {
            if (keys[j].org == keys[i].org && keys[j].dialect != dialect) {
                ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                              "keys \"%V\" and \"%V\" of org \"%V\" speak "
                              "different APIs, give each provider's keys "
                              "an org of their own", &keys[j].name,
                              &keys[i].name, &orgs[keys[i].org].name);
                return NGX_ERROR;
            }
        }

        if (dialect == RATEPOOL_DIALECT_OPENAI) {
            orgs[keys[i].org].combined = 1;
        }
    }

    for (i = 0; i < pool->orgs->nelts; i++) {
        orgs[i].combined = orgs[orgs[i].base].combined;

        /* OpenAI counts a prompt whole, cached or not, before it looks */
        orgs[i].cache_reads |= orgs[i].combined;

        if (orgs[i].combined && (orgs[i].itpm || orgs[i].otpm)) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "org \"%V\" has one limit for input and output "
                          "tokens (its keys speak OpenAI's API or it has "
                          "\"tpm=\"), use \"tpm=\" instead of \"itpm=\" "
                          "and \"otpm=\"", &orgs[i].name);
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_ratepool_check_key_names(ngx_conf_t *cf,
    ngx_http_ratepool_pool_t *p, ngx_http_ratepool_pool_t *q)
{
    ngx_uint_t                m, n;
    ngx_http_ratepool_org_t  *oa, *ob;
    ngx_http_ratepool_key_t  *a, *b;

    a = p->keys->elts;
    b = q->keys->elts;

    for (m = 0; m < p->keys->nelts; m++) {
        for (n = 0; n < q->keys->nelts; n++) {

            if (a[m].name.len != b[n].name.len
                || ngx_strncmp(a[m].name.data, b[n].name.data, a[m].name.len)
                   != 0)
            {
                continue;
            }

            oa = ngx_http_ratepool_key_org(p, &a[m]);
            ob = ngx_http_ratepool_key_org(q, &b[n]);

            if (ngx_memcmp(a[m].fingerprint, b[n].fingerprint,
                           RATEPOOL_FINGERPRINT_LEN) == 0
                && oa->name.len == ob->name.len
                && ngx_strncmp(oa->name.data, ob->name.data, oa->name.len)
                   == 0)
            {
                continue;
            }

            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "key \"%V\" is declared in upstreams \"%V\" and "
                          "\"%V\" with different secrets or orgs, give "
                          "each credential a name of its own", &a[m].name,
                          &p->upstream->host, &q->upstream->host);
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_ratepool_check_org_names(ngx_conf_t *cf,
    ngx_http_ratepool_pool_t *p, ngx_http_ratepool_pool_t *q)
{
    ngx_uint_t                m, n;
    ngx_http_ratepool_org_t  *a, *b;

    a = p->orgs->elts;
    b = q->orgs->elts;

    for (m = 0; m < p->orgs->nelts; m++) {
        for (n = 0; n < q->orgs->nelts; n++) {

            if (a[m].entry.len != b[n].entry.len
                || ngx_strncmp(a[m].entry.data, b[n].entry.data,
                               a[m].entry.len)
                   != 0
                || !a[m].declared || !b[n].declared
                || (a[m].rpm == b[n].rpm && a[m].itpm == b[n].itpm
                    && a[m].otpm == b[n].otpm && a[m].tpm == b[n].tpm
                    && a[m].cache_reads == b[n].cache_reads
                    && a[m].combined == b[n].combined))
            {
                continue;
            }

            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "org \"%V\" has different limits in upstreams "
                          "\"%V\" and \"%V\", an org has one set of "
                          "limits", &a[m].entry, &p->upstream->host,
                          &q->upstream->host);
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


static void
ngx_http_ratepool_free_sha256(void *data)
{
    ngx_http_ratepool_main_conf_t *rmcf = data;

    if (rmcf->sha256_ctx) {
        EVP_MD_CTX_free(rmcf->sha256_ctx);
    }

#if OPENSSL_VERSION_NUMBER >= 0x30000000L
    if (rmcf->sha256) {
        EVP_MD_free((EVP_MD *) rmcf->sha256);
    }
#endif
}


/* clients may be listed before the workspaces they name */

static char *
ngx_http_ratepool_init_main_conf(ngx_conf_t *cf, void *conf)
{
    ngx_http_ratepool_main_conf_t *rmcf = conf;

    ngx_uint_t                      i, j;
    ngx_pool_cleanup_t             *cln;
    ngx_http_ratepool_client_t     *client;
    ngx_http_ratepool_workspace_t  *ws;

    client = rmcf->clients.elts;
    ws = rmcf->workspaces.elts;

    /* where each workspace counts its use of each priced model */
    for (i = 0; i < rmcf->workspaces.nelts; i++) {
        ws[i].spend = ngx_pcalloc(cf->pool, (rmcf->prices.nelts + 1)
                                  * sizeof(ngx_http_ratepool_spend_sh_t *));
        if (ws[i].spend == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    for (i = 0; i < rmcf->clients.nelts; i++) {

        for (j = 0; j < rmcf->workspaces.nelts; j++) {
            if (ws[j].name.len == client[i].workspace_name.len
                && ngx_strncmp(ws[j].name.data, client[i].workspace_name.data,
                               ws[j].name.len)
                   == 0)
            {
                break;
            }
        }

        if (j == rmcf->workspaces.nelts) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "ratepool_client names unknown workspace \"%V\", "
                          "declare it with \"ratepool_workspace %V;\"",
                          &client[i].workspace_name,
                          &client[i].workspace_name);
            return NGX_CONF_ERROR;
        }

        client[i].workspace = j;

        for (j = 0; j < i; j++) {
            if (ngx_memcmp(client[i].digest, client[j].digest, 32) == 0) {
                ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                              "one client token is given to workspaces "
                              "\"%V\" and \"%V\", a token names one "
                              "workspace", &client[j].workspace_name,
                              &client[i].workspace_name);
                return NGX_CONF_ERROR;
            }

            if (client[i].workspace != client[j].workspace
                && client[i].name.len == client[j].name.len
                && ngx_strncmp(client[i].name.data, client[j].name.data,
                               client[i].name.len)
                   == 0)
            {
                ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                              "client name \"%V\" is given in workspaces "
                              "\"%V\" and \"%V\", a client's tokens are of "
                              "one workspace: name them apart",
                              &client[i].name, &client[j].workspace_name,
                              &client[i].workspace_name);
                return NGX_CONF_ERROR;
            }
        }
    }

    if (ngx_http_ratepool_check_pools(cf, rmcf) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    /*
     * OpenSSL 3 looks the algorithm up and allocates a context on every
     * one-shot digest; a token is hashed on every request, so both are
     * set up once here and inherited by the workers.
     */

#if OPENSSL_VERSION_NUMBER >= 0x30000000L
    rmcf->sha256 = EVP_MD_fetch(NULL, "SHA256", NULL);
#else
    rmcf->sha256 = EVP_sha256();
#endif
    rmcf->sha256_ctx = EVP_MD_CTX_new();

    cln = ngx_pool_cleanup_add(cf->pool, 0);
    if (cln == NULL) {
        return NGX_CONF_ERROR;
    }

    cln->handler = ngx_http_ratepool_free_sha256;
    cln->data = rmcf;

    if (rmcf->sha256 == NULL || rmcf->sha256_ctx == NULL) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "ratepool cannot set up SHA-256 in OpenSSL");
        return NGX_CONF_ERROR;
    }

    if ((rmcf->workspaces.nelts || rmcf->pools.nelts)
        && rmcf->shm_zone == NULL)
    {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "ratepool needs a shared memory zone, add "
                      "\"ratepool_zone ratepool:1m;\" to the http block");
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static void *
ngx_http_ratepool_create_srv_conf(ngx_conf_t *cf)
{
    ngx_http_ratepool_pool_t  *pool;

    pool = ngx_pcalloc(cf->pool, sizeof(ngx_http_ratepool_pool_t));
    if (pool == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     pool->zone_name = { 0, NULL };
     *     pool->orgs = NULL;
     *     pool->keys = NULL;
     *     pool->upstream = NULL;
     */

    return pool;
}


static void *
ngx_http_ratepool_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_ratepool_loc_conf_t  *rlcf;

    rlcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_ratepool_loc_conf_t));
    if (rlcf == NULL) {
        return NULL;
    }

    rlcf->output_reserve = NGX_CONF_UNSET;
    rlcf->wait = NGX_CONF_UNSET_MSEC;

    return rlcf;
}


static char *
ngx_http_ratepool_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_http_ratepool_loc_conf_t *prev = parent;
    ngx_http_ratepool_loc_conf_t *conf = child;

    ngx_http_core_loc_conf_t        *clcf;
    ngx_http_ratepool_loc_conf_t   **pass;
    ngx_http_ratepool_main_conf_t   *rmcf;

    /*
     * ratepool_pass is not inherited, as proxy_pass is not, except by
     * an "if" block, where the proxy's settings carry on too
     */

    ngx_conf_merge_value(conf->output_reserve, prev->output_reserve,
                         RATEPOOL_OUTPUT_RESERVE);
    ngx_conf_merge_msec_value(conf->wait, prev->wait, 0);

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);

    if (conf->url.len || prev->url.len == 0 || !clcf->noname) {
        return NGX_CONF_OK;
    }

    conf->url = prev->url;
    conf->file = prev->file;
    conf->line = prev->line;

    rmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_ratepool_module);

    pass = ngx_array_push(&rmcf->passes);
    if (pass == NULL) {
        return NGX_CONF_ERROR;
    }

    *pass = conf;

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_ratepool_init_process(ngx_cycle_t *cycle)
{
    ngx_http_ratepool_zone_t       *zone;
    ngx_http_ratepool_main_conf_t  *rmcf;

    rmcf = ngx_http_cycle_get_module_main_conf(cycle,
                                               ngx_http_ratepool_module);

    if (rmcf == NULL || rmcf->shm_zone == NULL) {
        return NGX_OK;
    }

    zone = rmcf->shm_zone->data;

    /* the first worker of each start or reload says what it serves */
    if (ngx_process == NGX_PROCESS_WORKER && ngx_worker == 0) {
        ngx_http_ratepool_log_summary(cycle, rmcf);
    }

    if (ngx_http_ratepool_tokens_init(cycle, rmcf) != NGX_OK) {
        return NGX_ERROR;
    }

    return zone->store->init_process(cycle, rmcf);
}


/*
 * What an operator checks after a start or a reload: the store, and
 * each pool's keys with their orgs and fingerprints (never a secret).
 */

static void
ngx_http_ratepool_log_summary(ngx_cycle_t *cycle,
    ngx_http_ratepool_main_conf_t *rmcf)
{
    u_char                     *p, *last, line[NGX_MAX_ERROR_STR];
    ngx_uint_t                  i, j;
    ngx_http_ratepool_key_t    *keys;
    ngx_http_ratepool_org_t    *orgs;
    ngx_http_ratepool_pool_t  **pools;

    pools = rmcf->pools.elts;

    if (rmcf->redis) {
        ngx_log_error(NGX_LOG_NOTICE, cycle->log, 0,
                      "ratepool: zone \"%V\" serves %ui pools, %ui "
                      "workspaces and %ui client tokens, its limits shared "
                      "in redis at %V", &rmcf->shm_zone->shm.name,
                      rmcf->pools.nelts, rmcf->workspaces.nelts,
                      rmcf->clients.nelts, &rmcf->redis->server);

    } else {
        ngx_log_error(NGX_LOG_NOTICE, cycle->log, 0,
                      "ratepool: zone \"%V\" serves %ui pools, %ui "
                      "workspaces and %ui client tokens, its limits in "
                      "this gateway's shared memory",
                      &rmcf->shm_zone->shm.name, rmcf->pools.nelts,
                      rmcf->workspaces.nelts, rmcf->clients.nelts);
    }

    /* the line is cut where the error log's would be */
    last = line + NGX_MAX_ERROR_STR - 256;

    for (i = 0; i < rmcf->pools.nelts; i++) {
        keys = pools[i]->keys->elts;
        orgs = pools[i]->orgs->elts;
        p = line;

        for (j = 0; j < pools[i]->keys->nelts; j++) {
            p = ngx_slprintf(p, last, "%s%V (%V, %V, %*s)", j ? ", " : "",
                             &keys[j].name, &orgs[keys[j].org].name,
                             &keys[j].provider->name,
                             (size_t) RATEPOOL_FINGERPRINT_LEN,
                             keys[j].fingerprint);
        }

        ngx_log_error(NGX_LOG_NOTICE, cycle->log, 0,
                      "ratepool: pool \"%V\" has %ui keys: %*s",
                      &pools[i]->upstream->host, pools[i]->keys->nelts,
                      (size_t) (p - line), line);
    }
}


static void
ngx_http_ratepool_exit_process(ngx_cycle_t *cycle)
{
    ngx_http_ratepool_zone_t       *zone;
    ngx_http_ratepool_main_conf_t  *rmcf;

    rmcf = ngx_http_cycle_get_module_main_conf(cycle,
                                               ngx_http_ratepool_module);

    if (rmcf && rmcf->shm_zone) {
        zone = rmcf->shm_zone->data;
        zone->store->exit_process(rmcf);
    }
}


/* a key meant for TLS (port 443) must not go out in clear text */

static ngx_int_t
ngx_http_ratepool_check_cleartext(ngx_conf_t *cf,
    ngx_http_ratepool_loc_conf_t *pass, ngx_http_ratepool_pool_t *pool)
{
    ngx_uint_t                i;
    ngx_http_ratepool_key_t  *keys;

    keys = pool->keys ? pool->keys->elts : NULL;

    for (i = 0; keys && i < pool->keys->nelts; i++) {
        if (keys[i].port == 443) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "ratepool_pass \"%V\" in %V:%ui would send key "
                          "\"%V\" to port 443 without TLS, use "
                          "\"https://\"", &pass->url, &pass->file,
                          pass->line, &keys[i].name);
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


/* pair each ratepool_pass with its pool, now that every upstream is known */

static ngx_int_t
ngx_http_ratepool_link_passes(ngx_conf_t *cf,
    ngx_http_ratepool_main_conf_t *rmcf)
{
    size_t                           scheme;
    ngx_str_t                        name;
    ngx_uint_t                       i, j;
    ngx_http_ratepool_pool_t        *pool;
    ngx_http_ratepool_loc_conf_t   **pass;
    ngx_http_upstream_srv_conf_t   **uscfp;
    ngx_http_upstream_main_conf_t   *umcf;

    umcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_upstream_module);
    uscfp = umcf->upstreams.elts;
    pass = rmcf->passes.elts;

    for (i = 0; i < rmcf->passes.nelts; i++) {

        scheme = pass[i]->url.data[4] == 's' ? 8 : 7;
        name.data = pass[i]->url.data + scheme;
        name.len = pass[i]->url.len - scheme;

        pool = NULL;

        for (j = 0; j < umcf->upstreams.nelts; j++) {
            if (uscfp[j]->host.len == name.len
                && ngx_strncasecmp(uscfp[j]->host.data, name.data, name.len)
                   == 0
                && uscfp[j]->srv_conf)
            {
                pool = ngx_http_conf_upstream_srv_conf(uscfp[j],
                                                    ngx_http_ratepool_module);
                break;
            }
        }

        if (pool == NULL || pool->upstream == NULL) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "ratepool_pass \"%V\" in %V:%ui needs an upstream "
                          "\"%V\" with the \"ratepool\" directive",
                          &pass[i]->url, &pass[i]->file, pass[i]->line,
                          &name);
            return NGX_ERROR;
        }

        if (scheme == 7 && ngx_http_ratepool_check_cleartext(cf, pass[i],
                                                               pool)
                           != NGX_OK)
        {
            return NGX_ERROR;
        }

        pass[i]->pool = pool;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_ratepool_init(ngx_conf_t *cf)
{
    static ngx_str_t  request_id = ngx_string("request_id");

    ngx_uint_t                      i;
    ngx_http_handler_pt            *h;
    ngx_http_ratepool_pool_t      **pools;
    ngx_http_core_main_conf_t      *cmcf;
    ngx_http_ratepool_main_conf_t  *rmcf;

    rmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_ratepool_module);

    if (ngx_http_ratepool_link_passes(cf, rmcf) != NGX_OK) {
        return NGX_ERROR;
    }

    pools = rmcf->pools.elts;

    for (i = 0; i < rmcf->pools.nelts; i++) {

        if (pools[i]->zone == NULL) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "upstream \"%V\" has \"ratepool\" and another "
                          "balancer; ratepool chooses the keys, remove "
                          "the other one", &pools[i]->upstream->host);
            return NGX_ERROR;
        }

        if (ngx_http_ratepool_check_keepalive(cf, pools[i]) != NGX_OK
            || ngx_http_ratepool_init_waiting(cf, pools[i],
                                       rmcf->workspaces.nelts,
                                       &ngx_http_ratepool_admission_hooks)
               != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    rmcf->request_id_index = ngx_http_get_variable_index(cf, &request_id);

    if (rmcf->request_id_index == NGX_ERROR) {
        return NGX_ERROR;
    }

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_ACCESS_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_ratepool_access_handler;

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_LOG_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_ratepool_log_handler;

    return ngx_http_ratepool_filter_init(cf);
}


/*
 * Copyright (C) ratepool authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <openssl/evp.h>

#include <openssl/pem.h>

#include "ngx_http_ratepool.h"
#include "ngx_http_ratepool_conf.h"
#include "ngx_http_ratepool_pool.h"
#include "ngx_http_ratepool_shm.h"
#include "ngx_http_ratepool_status.h"
#include "ngx_http_ratepool_store.h"


/*
 * The directives' parsers: each checks its name=value arguments and
 * fails "nginx -t" with a message that names the bad text and the fix.
 * Checks across directives are the module's, once all are read.
 */


#define RATEPOOL_SECRET_MAX        4096


static ngx_int_t ngx_http_ratepool_valid_name(ngx_str_t *name);
static char *ngx_http_ratepool_check_name(ngx_conf_t *cf, ngx_str_t *name);
static ngx_int_t ngx_http_ratepool_parse_limit(ngx_str_t *arg,
    const char *name, ngx_uint_t *limit);
static ngx_int_t ngx_http_ratepool_valid_model(ngx_str_t *model);
static ngx_int_t ngx_http_ratepool_parse_money(ngx_str_t *value,
    const char *name, uint64_t *nano);
static ngx_http_ratepool_org_t *ngx_http_ratepool_find_org(ngx_conf_t *cf,
    ngx_http_ratepool_pool_t *pool, ngx_str_t *name, ngx_str_t *model,
    ngx_uint_t *index);
static char *ngx_http_ratepool_zone_redis(ngx_conf_t *cf,
    ngx_http_ratepool_main_conf_t *rmcf, ngx_str_t *zone_name);
static ngx_int_t ngx_http_ratepool_read_secret(ngx_conf_t *cf,
    ngx_str_t *path, ngx_str_t *secret);
static void ngx_http_ratepool_sha256(u_char *data, size_t len,
    u_char digest[32]);
static ngx_int_t ngx_http_ratepool_header_safe(ngx_str_t *s);
static ngx_int_t ngx_http_ratepool_read_small(ngx_conf_t *cf,
    ngx_str_t *path, size_t max, const char *what, ngx_str_t *secret);
static ngx_int_t ngx_http_ratepool_redis_nodes(ngx_conf_t *cf,
    ngx_str_t *list, in_port_t port, const char *name, ngx_addr_t **nodes,
    ngx_uint_t *n);
static ngx_int_t ngx_http_ratepool_redis_tls(ngx_conf_t *cf,
    ngx_http_ratepool_redis_conf_t *redis, ngx_str_t *ca, ngx_str_t *cert,
    ngx_str_t *key, ngx_str_t *name);
static ngx_int_t ngx_http_ratepool_google(ngx_conf_t *cf,
    ngx_http_ratepool_key_t *key, ngx_str_t *account, ngx_str_t *url,
    ngx_str_t *ca);
static ngx_int_t ngx_http_ratepool_json_field(ngx_conf_t *cf,
    ngx_str_t *json, const char *name, ngx_str_t *value);
static void ngx_http_ratepool_free_pkey(void *data);
static ngx_int_t ngx_http_ratepool_read_aws_keys(ngx_conf_t *cf,
    ngx_http_ratepool_key_t *key, ngx_str_t *path);


/*
 * provider=: the API a key's clients speak there, and how the key is
 * sent.  OpenAI-compatible servers (OpenRouter, vLLM, LiteLLM) are
 * "openai"; Anthropic-compatible ones are "anthropic".
 */

static ngx_http_ratepool_provider_t  ngx_http_ratepool_providers[] = {
    { ngx_string("anthropic"), RATEPOOL_DIALECT_ANTHROPIC,
      RATEPOOL_CREDENTIAL_X_API_KEY, RATEPOOL_SERVICE_DIRECT },
    { ngx_string("openai"), RATEPOOL_DIALECT_OPENAI,
      RATEPOOL_CREDENTIAL_BEARER, RATEPOOL_SERVICE_DIRECT },
    { ngx_string("azure"), RATEPOOL_DIALECT_OPENAI,
      RATEPOOL_CREDENTIAL_API_KEY, RATEPOOL_SERVICE_DIRECT },
    /* a Bedrock API key, or AWS credentials (aws_key_file=) */
    { ngx_string("bedrock"), RATEPOOL_DIALECT_ANTHROPIC,
      RATEPOOL_CREDENTIAL_BEARER, RATEPOOL_SERVICE_BEDROCK },
    { ngx_string("bedrock-invoke"), RATEPOOL_DIALECT_ANTHROPIC,
      RATEPOOL_CREDENTIAL_BEARER, RATEPOOL_SERVICE_INVOKE },
    /* a service account's JSON key (service_account_file=) */
    { ngx_string("vertex"), RATEPOOL_DIALECT_ANTHROPIC,
      RATEPOOL_CREDENTIAL_GOOGLE, RATEPOOL_SERVICE_VERTEX },
    { ngx_null_string, 0, 0, 0 }
};


/* what ratepool_pass means: a proxy set up to re-send with another key */

static const char  ngx_http_ratepool_proxy_conf[] =
    "proxy_pass %V;"
    "proxy_http_version 1.1;"
    "proxy_set_header Host $ratepool_upstream_host;"
    "proxy_set_header Connection \"\";"
    "proxy_set_header x-api-key $ratepool_upstream_x_api_key;"
    "proxy_set_header Authorization $ratepool_upstream_authorization;"
    "proxy_set_header api-key $ratepool_upstream_api_key;"
    "proxy_set_header X-Amz-Date $ratepool_upstream_amz_date;"
    "proxy_set_header X-Amz-Security-Token $ratepool_upstream_amz_token;"
    "proxy_set_header Accept-Encoding \"\";"
    "proxy_request_buffering on;"
    "proxy_buffering off;"
    "proxy_next_upstream error timeout http_429 non_idempotent;"
    /* the gateway, not its clients, chooses where its keys are billed */
    "proxy_set_header anthropic-workspace-id \"\";"
    "proxy_set_header OpenAI-Organization \"\";"
    "proxy_set_header OpenAI-Project \"\";"
    /* nor do they learn which org answered them */
    "proxy_hide_header anthropic-organization-id;"
    "proxy_hide_header openai-organization;"
    "proxy_hide_header openai-project;"
    ;


/* keys go only to servers whose certificates verify, unless told not to */

#define RATEPOOL_CA_FILE  "/etc/ssl/certs/ca-certificates.crt"

#if (NGX_HTTP_SSL)

static const char  ngx_http_ratepool_tls_conf[] =
    "proxy_ssl_server_name on;"
    "proxy_ssl_name $ratepool_upstream_host;"
    "proxy_ssl_verify on;"
    "proxy_ssl_verify_depth 4;"
    "proxy_ssl_trusted_certificate \"%V\";";

static const char  ngx_http_ratepool_tls_noverify_conf[] =
    "proxy_ssl_server_name on;"
    "proxy_ssl_name $ratepool_upstream_host;"
    "proxy_ssl_verify off;";

#endif


static ngx_int_t
ngx_http_ratepool_valid_name(ngx_str_t *name)
{
    u_char  c;
    size_t  i;

    if (name->len == 0 || name->len > RATEPOOL_NAME_MAX) {
        return NGX_ERROR;
    }

    for (i = 0; i < name->len; i++) {
        c = name->data[i];

        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
              || (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '.'))
        {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


static char *
ngx_http_ratepool_check_name(ngx_conf_t *cf, ngx_str_t *name)
{
    if (ngx_http_ratepool_valid_name(name) != NGX_OK) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid name \"%V\", use up to %d letters, "
                           "digits, \"-\", \"_\" or \".\"",
                           name, RATEPOOL_NAME_MAX);
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


/* "rpm=50" and the like: a positive integer limit */

static ngx_int_t
ngx_http_ratepool_parse_limit(ngx_str_t *arg, const char *name,
    ngx_uint_t *limit)
{
    size_t     len;
    ngx_int_t  n;

    len = ngx_strlen(name);

    if (arg->len <= len + 1 || ngx_strncmp(arg->data, name, len) != 0
        || arg->data[len] != '=')
    {
        return NGX_DECLINED;
    }

    n = ngx_atoi(arg->data + len + 1, arg->len - len - 1);

    if (n <= 0) {
        return NGX_ERROR;
    }

    *limit = (ngx_uint_t) n;

    return NGX_OK;
}


char *
ngx_http_ratepool_zone(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_ratepool_main_conf_t *rmcf = conf;

    u_char                    *p;
    ssize_t                    size;
    ngx_str_t                 *value, name, s;
    ngx_http_ratepool_zone_t  *zone;

    if (rmcf->shm_zone) {
        return "is duplicate, one zone holds all pools and workspaces";
    }

    value = cf->args->elts;

    p = (u_char *) ngx_strchr(value[1].data, ':');

    if (p == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid zone \"%V\", use \"name:size\", "
                           "for example \"ratepool:1m\"", &value[1]);
        return NGX_CONF_ERROR;
    }

    name.data = value[1].data;
    name.len = p - value[1].data;

    if (ngx_http_ratepool_check_name(cf, &name) != NGX_CONF_OK) {
        return NGX_CONF_ERROR;
    }

    s.data = p + 1;
    s.len = value[1].data + value[1].len - s.data;

    size = ngx_parse_size(&s);

    if (size == NGX_ERROR) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid zone size \"%V\"", &value[1]);
        return NGX_CONF_ERROR;
    }

    if (size < (ssize_t) (8 * ngx_pagesize)) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "zone \"%V\" is too small, use at least %uzk",
                           &value[1], 8 * ngx_pagesize / 1024);
        return NGX_CONF_ERROR;
    }

    zone = ngx_pcalloc(cf->pool, sizeof(ngx_http_ratepool_zone_t));
    if (zone == NULL) {
        return NGX_CONF_ERROR;
    }

    zone->conf = rmcf;
    zone->store = &ngx_http_ratepool_store_local;

    rmcf->shm_zone = ngx_shared_memory_add(cf, &name, size,
                                           &ngx_http_ratepool_module);
    if (rmcf->shm_zone == NULL) {
        return NGX_CONF_ERROR;
    }

    if (rmcf->shm_zone->data) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "zone \"%V\" is already used", &name);
        return NGX_CONF_ERROR;
    }

    rmcf->shm_zone->init = ngx_http_ratepool_init_zone;
    rmcf->shm_zone->data = zone;

    if (cf->args->nelts > 2) {
        return ngx_http_ratepool_zone_redis(cf, rmcf, &name);
    }

    return NGX_CONF_OK;
}


/*
 * ratepool_zone NAME:SIZE redis=HOST:PORT|rediss://HOST:PORT|unix:PATH
 *               | redis_sentinel=HOST:PORT,... redis_master=NAME
 *               | redis_cluster=HOST:PORT,...  [redis_db=N]
 *               [redis_user=NAME] [redis_password_file=PATH]
 *               [redis_timeout=TIME] [redis_lease=on|off]
 *               [redis_fail=local|open|closed]
 */

static char *
ngx_http_ratepool_zone_redis(ngx_conf_t *cf,
    ngx_http_ratepool_main_conf_t *rmcf, ngx_str_t *zone_name)
{
    u_char                          *p;
    ngx_str_t                       *value, v, path, tls_ca, tls_cert,
                                     tls_key, tls_name;
    ngx_url_t                        u;
    ngx_int_t                        n;
    ngx_uint_t                       i;
    ngx_http_ratepool_redis_conf_t  *redis;
    u_char                           digest[20];
    unsigned int                     len;

    value = cf->args->elts;

    ngx_str_null(&tls_ca);
    ngx_str_null(&tls_cert);
    ngx_str_null(&tls_key);
    ngx_str_null(&tls_name);

    redis = ngx_pcalloc(cf->pool, sizeof(ngx_http_ratepool_redis_conf_t));
    if (redis == NULL) {
        return NGX_CONF_ERROR;
    }

    /* a busy machine keeps it; a provider answers in hundreds of ms */
    redis->timeout = 50;
    redis->fail = RATEPOOL_REDIS_FAIL_LOCAL;
    redis->lease = 1;

    for (i = 2; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "redis=", 6) == 0) {
            redis->server.data = value[i].data + 6;
            redis->server.len = value[i].len - 6;

            /* rediss://: TLS, as redis-cli and the client libraries say */
            if (redis->server.len > 9
                && ngx_strncmp(redis->server.data, "rediss://", 9) == 0)
            {
                redis->server.data += 9;
                redis->server.len -= 9;
                redis->tls = 1;

            } else if (redis->server.len > 8
                       && ngx_strncmp(redis->server.data, "redis://", 8)
                          == 0)
            {
                redis->server.data += 8;
                redis->server.len -= 8;
            }

            ngx_memzero(&u, sizeof(ngx_url_t));
            u.url = redis->server;
            u.default_port = 6379;
            u.no_resolve = 0;

            if (ngx_parse_url(cf->pool, &u) != NGX_OK || u.naddrs == 0) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid \"%V\": %s; use "
                                   "\"redis=HOST:PORT\", "
                                   "\"redis=rediss://HOST:PORT\" (TLS) or "
                                   "\"redis=unix:/path/to/redis.sock\"",
                                   &value[i],
                                   u.err ? u.err : "no address");
                return NGX_CONF_ERROR;
            }

            redis->addrs = u.addrs;
            redis->host = u.host;
            continue;
        }

        if (ngx_strncmp(value[i].data, "redis_sentinel=", 15) == 0) {
            v.data = value[i].data + 15;
            v.len = value[i].len - 15;

            if (ngx_http_ratepool_redis_nodes(cf, &v, 26379,
                                              "redis_sentinel=",
                                              &redis->sentinels,
                                              &redis->nsentinels)
                != NGX_OK)
            {
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "redis_cluster=", 14) == 0) {
            v.data = value[i].data + 14;
            v.len = value[i].len - 14;

            if (ngx_http_ratepool_redis_nodes(cf, &v, 6379,
                                              "redis_cluster=",
                                              &redis->cluster_nodes,
                                              &redis->ncluster)
                != NGX_OK)
            {
                return NGX_CONF_ERROR;
            }

            redis->server = v;
            continue;
        }

        if (ngx_strncmp(value[i].data, "redis_master=", 13) == 0) {
            redis->master.data = value[i].data + 13;
            redis->master.len = value[i].len - 13;

            if (ngx_http_ratepool_valid_name(&redis->master) != NGX_OK) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid \"%V\", use the name the "
                                   "sentinels monitor the master by, such "
                                   "as \"redis_master=mymaster\"",
                                   &value[i]);
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (ngx_strcmp(value[i].data, "redis_tls=on") == 0) {
            redis->tls = 1;
            continue;
        }

        if (ngx_strcmp(value[i].data, "redis_tls=off") == 0) {
            redis->tls = 0;
            continue;
        }

        if (ngx_strncmp(value[i].data, "redis_tls_ca=", 13) == 0) {
            tls_ca.data = value[i].data + 13;
            tls_ca.len = value[i].len - 13;
            continue;
        }

        if (ngx_strncmp(value[i].data, "redis_tls_cert=", 15) == 0) {
            tls_cert.data = value[i].data + 15;
            tls_cert.len = value[i].len - 15;
            continue;
        }

        if (ngx_strncmp(value[i].data, "redis_tls_key=", 14) == 0) {
            tls_key.data = value[i].data + 14;
            tls_key.len = value[i].len - 14;
            continue;
        }

        if (ngx_strncmp(value[i].data, "redis_tls_name=", 15) == 0) {
            tls_name.data = value[i].data + 15;
            tls_name.len = value[i].len - 15;
            continue;
        }

        if (ngx_strncmp(value[i].data, "redis_db=", 9) == 0) {
            n = ngx_atoi(value[i].data + 9, value[i].len - 9);

            if (n == NGX_ERROR || n > 15) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid \"%V\", use a database number "
                                   "of 0 to 15", &value[i]);
                return NGX_CONF_ERROR;
            }

            redis->db = n;
            continue;
        }

        if (ngx_strncmp(value[i].data, "redis_user=", 11) == 0) {
            redis->user.data = value[i].data + 11;
            redis->user.len = value[i].len - 11;
            continue;
        }

        if (ngx_strncmp(value[i].data, "redis_password_file=", 20) == 0) {
            path.data = value[i].data + 20;
            path.len = value[i].len - 20;

            if (ngx_http_ratepool_read_secret(cf, &path, &redis->password)
                != NGX_OK)
            {
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "redis_timeout=", 14) == 0) {
            v.data = value[i].data + 14;
            v.len = value[i].len - 14;

            n = ngx_parse_time(&v, 0);

            if (n == NGX_ERROR || n == 0 || n > 10000) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid \"%V\", use a time from 1ms "
                                   "to 10s, for example "
                                   "\"redis_timeout=5ms\"", &value[i]);
                return NGX_CONF_ERROR;
            }

            redis->timeout = (ngx_msec_t) n;
            continue;
        }

        if (ngx_strcmp(value[i].data, "redis_lease=on") == 0) {
            redis->lease = 1;
            continue;
        }

        if (ngx_strcmp(value[i].data, "redis_lease=off") == 0) {
            redis->lease = 0;
            continue;
        }

        if (ngx_strcmp(value[i].data, "redis_fail=local") == 0) {
            redis->fail = RATEPOOL_REDIS_FAIL_LOCAL;
            continue;
        }

        if (ngx_strcmp(value[i].data, "redis_fail=open") == 0) {
            redis->fail = RATEPOOL_REDIS_FAIL_OPEN;
            continue;
        }

        if (ngx_strcmp(value[i].data, "redis_fail=closed") == 0) {
            redis->fail = RATEPOOL_REDIS_FAIL_CLOSED;
            continue;
        }

        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid parameter \"%V\", use \"redis=\", "
                           "\"redis_db=\", \"redis_user=\", "
                           "\"redis_password_file=\", \"redis_timeout=\", "
                           "\"redis_lease=on|off\", "
                           "\"redis_fail=local|open|closed\", "
                           "\"redis_tls=on|off\", \"redis_tls_ca=\", "
                           "\"redis_tls_cert=\", \"redis_tls_key=\", "
                           "\"redis_tls_name=\", \"redis_sentinel=\", "
                           "\"redis_master=\" or \"redis_cluster=\"",
                           &value[i]);
        return NGX_CONF_ERROR;
    }

    if ((redis->nsentinels == 0) != (redis->master.len == 0)) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"redis_sentinel=\" and \"redis_master=\" go "
                           "together: the sentinels, and the name they "
                           "know the master by");
        return NGX_CONF_ERROR;
    }

    if (redis->ncluster) {
        if (redis->addrs || redis->nsentinels || redis->tls) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "\"redis_cluster=\" names the cluster's "
                               "nodes alone: leave \"redis=\" and "
                               "\"redis_sentinel=\" out (TLS to a "
                               "cluster is not supported yet)");
            return NGX_CONF_ERROR;
        }

        if (redis->db) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "a Redis Cluster has database 0 alone: "
                               "leave \"redis_db=\" out");
            return NGX_CONF_ERROR;
        }

        redis->addrs = redis->cluster_nodes;
        redis->naddrs = redis->ncluster;
        redis->cluster = 1;

    } else if (redis->addrs) {
        redis->naddrs = 1;
    }

    if (redis->nsentinels && redis->addrs) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "zone \"%V\" has both \"redis=\" and "
                           "\"redis_sentinel=\": the sentinels say where "
                           "the master is, leave \"redis=\" out", zone_name);
        return NGX_CONF_ERROR;
    }

    if (redis->nsentinels) {
        /* as the status and the log name it until it is found */
        redis->server = redis->master;

    } else if (redis->addrs == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "zone \"%V\" has Redis parameters but no server, "
                           "add \"redis=HOST:PORT\"", zone_name);
        return NGX_CONF_ERROR;
    }

    if (redis->nsentinels && redis->tls) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "TLS to a master found by sentinels is not "
                           "supported yet: use \"redis=rediss://HOST:PORT\" "
                           "or leave TLS out");
        return NGX_CONF_ERROR;
    }

    if (redis->user.len && redis->password.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"redis_user=\" needs "
                           "\"redis_password_file=\"");
        return NGX_CONF_ERROR;
    }

    if (ngx_http_ratepool_redis_tls(cf, redis, &tls_ca, &tls_cert, &tls_key,
                                    &tls_name)
        != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    /* every gateway sharing the pool names the zone the same way */

    redis->prefix.len = sizeof("ratepool:{}:") - 1 + zone_name->len;
    redis->prefix.data = ngx_pnalloc(cf->pool, redis->prefix.len);
    if (redis->prefix.data == NULL) {
        return NGX_CONF_ERROR;
    }

    p = ngx_cpymem(redis->prefix.data, "ratepool:{", 10);
    p = ngx_cpymem(p, zone_name->data, zone_name->len);
    ngx_memcpy(p, "}:", 2);

    len = sizeof(digest);

    if (EVP_Digest(ratepool_script, ngx_strlen(ratepool_script), digest,
                   &len, EVP_sha1(), NULL)
        != 1)
    {
        return NGX_CONF_ERROR;
    }

    ngx_hex_dump(redis->sha, digest, sizeof(digest));

    rmcf->redis = redis;
    ((ngx_http_ratepool_zone_t *) rmcf->shm_zone->data)->store =
                                                &ngx_http_ratepool_store_redis;

    return NGX_CONF_OK;
}


/* redis_sentinel= and redis_cluster=: HOST:PORT[,HOST:PORT...] */

static ngx_int_t
ngx_http_ratepool_redis_nodes(ngx_conf_t *cf, ngx_str_t *list,
    in_port_t port, const char *name, ngx_addr_t **nodes, ngx_uint_t *n)
{
    u_char       *p, *last, *comma;
    ngx_url_t     u;
    ngx_uint_t    i;
    ngx_array_t  *addrs;
    ngx_addr_t   *a;

    addrs = ngx_array_create(cf->pool, 3, sizeof(ngx_addr_t));
    if (addrs == NULL) {
        return NGX_ERROR;
    }

    p = list->data;
    last = list->data + list->len;

    while (p < last) {
        comma = ngx_strlchr(p, last, ',');
        if (comma == NULL) {
            comma = last;
        }

        ngx_memzero(&u, sizeof(ngx_url_t));
        u.url.data = p;
        u.url.len = comma - p;
        u.default_port = port;

        if (u.url.len == 0 || ngx_parse_url(cf->pool, &u) != NGX_OK
            || u.naddrs == 0 || u.family == AF_UNIX)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid node \"%*s\" in \"%s%V\": %s; use "
                               "\"%sHOST:PORT,HOST:PORT\"",
                               comma - p, p, name, list,
                               u.err ? u.err : "no address", name);
            return NGX_ERROR;
        }

        for (i = 0; i < u.naddrs; i++) {
            a = ngx_array_push(addrs);
            if (a == NULL) {
                return NGX_ERROR;
            }

            *a = u.addrs[i];
        }

        p = comma + 1;
    }

    *nodes = addrs->elts;
    *n = addrs->nelts;

    if (*n == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%s\" needs at least one node, such as "
                           "\"%sHOST:PORT,HOST:PORT\"", name, name);
        return NGX_ERROR;
    }

    return NGX_OK;
}


/*
 * TLS to Redis: its certificate verified against redis_tls_ca= (or the
 * system's CAs) for redis_tls_name= (or the host of redis=), a client
 * certificate if Redis asks for one; never plain text instead.
 */

static ngx_int_t
ngx_http_ratepool_redis_tls(ngx_conf_t *cf,
    ngx_http_ratepool_redis_conf_t *redis, ngx_str_t *ca, ngx_str_t *cert,
    ngx_str_t *key, ngx_str_t *name)
{
    if (!redis->tls) {
        if (ca->len || cert->len || key->len || name->len) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "\"redis_tls_*\" parameters need TLS: use "
                               "\"redis=rediss://HOST:PORT\" or "
                               "\"redis_tls=on\"");
            return NGX_ERROR;
        }

        return NGX_OK;
    }

    if (redis->addrs[0].sockaddr->sa_family == AF_UNIX) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "TLS to redis at a unix socket is not supported, "
                           "use \"redis=rediss://HOST:PORT\"");
        return NGX_ERROR;
    }

    if ((cert->len == 0) != (key->len == 0)) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"redis_tls_cert=\" and \"redis_tls_key=\" go "
                           "together: give both, or neither");
        return NGX_ERROR;
    }

#if (NGX_HTTP_SSL)

    if (name->len == 0) {
        name = &redis->host;
    }

    /* NUL-terminated for OpenSSL; an address is checked, never sent */
    redis->tls_name.len = name->len;
    redis->tls_name.data = ngx_pnalloc(cf->pool, name->len + 1);
    if (redis->tls_name.data == NULL) {
        return NGX_ERROR;
    }

    ngx_memcpy(redis->tls_name.data, name->data, name->len);
    redis->tls_name.data[name->len] = '\0';

    redis->tls_sni = (name->len && name->data[0] != '['
                      && ngx_inet_addr(name->data, name->len) == INADDR_NONE);

    redis->ssl = ngx_http_ratepool_tls_client(cf, ca, cert, key);

    return redis->ssl ? NGX_OK : NGX_ERROR;

#else

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "TLS to redis needs nginx with TLS");
    return NGX_ERROR;

#endif
}


/* model patterns: what model names are made of, and "*" */

static ngx_int_t
ngx_http_ratepool_valid_model(ngx_str_t *model)
{
    u_char  c;
    size_t  i;

    if (model->len == 0 || model->len > RATEPOOL_NAME_MAX) {
        return NGX_ERROR;
    }

    for (i = 0; i < model->len; i++) {
        c = model->data[i];

        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
              || (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '.'
              || c == '*' || c == '/' || c == ':' || c == '@'))
        {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


/*
 * An org's entry for a model class, created on first mention; a class
 * entry comes after its org's default one, which keys point to.
 */

static ngx_http_ratepool_org_t *
ngx_http_ratepool_find_org(ngx_conf_t *cf, ngx_http_ratepool_pool_t *pool,
    ngx_str_t *name, ngx_str_t *model, ngx_uint_t *index)
{
    u_char                   *p;
    ngx_str_t                 none;
    ngx_uint_t                i, base;
    ngx_http_ratepool_org_t  *org;

    if (pool->orgs == NULL) {
        pool->orgs = ngx_array_create(cf->pool, 4,
                                      sizeof(ngx_http_ratepool_org_t));
        if (pool->orgs == NULL) {
            return NULL;
        }
    }

    org = pool->orgs->elts;

    for (i = 0; i < pool->orgs->nelts; i++) {
        if (ngx_http_ratepool_str_eq(&org[i].name, name)
            && ngx_http_ratepool_str_eq(&org[i].model, model))
        {
            *index = i;
            return &org[i];
        }
    }

    base = pool->orgs->nelts;

    if (model->len) {
        ngx_str_null(&none);

        if (ngx_http_ratepool_find_org(cf, pool, name, &none, &base)
            == NULL)
        {
            return NULL;
        }

        pool->classes++;
    }

    org = ngx_array_push(pool->orgs);
    if (org == NULL) {
        return NULL;
    }

    ngx_memzero(org, sizeof(ngx_http_ratepool_org_t));
    org->name = *name;
    org->model = *model;
    org->base = base;
    org->entry = *name;

    if (model->len) {
        p = ngx_pnalloc(cf->pool, name->len + 1 + model->len);
        if (p == NULL) {
            return NULL;
        }

        org->entry.data = p;
        p = ngx_cpymem(p, name->data, name->len);
        *p++ = '/';
        p = ngx_cpymem(p, model->data, model->len);
        org->entry.len = p - org->entry.data;
    }

    *index = pool->orgs->nelts - 1;

    return org;
}


/*
 * ratepool_org NAME [model=PATTERN] [rpm=N] [itpm=N] [otpm=N] [tpm=N]
 *              [itpm_cache_reads=on|off]
 */

char *
ngx_http_ratepool_org(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_ratepool_pool_t *pool = conf;

    ngx_int_t                 rc;
    ngx_str_t                *value, model;
    ngx_uint_t                i, index, rpm, itpm, otpm, tpm, cache_reads;
    ngx_http_ratepool_org_t  *org;

    value = cf->args->elts;

    if (ngx_http_ratepool_check_name(cf, &value[1]) != NGX_CONF_OK) {
        return NGX_CONF_ERROR;
    }

    ngx_str_null(&model);
    rpm = 0;
    itpm = 0;
    otpm = 0;
    tpm = 0;
    cache_reads = 0;

    for (i = 2; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "model=", 6) == 0) {
            model.data = value[i].data + 6;
            model.len = value[i].len - 6;

            if (ngx_http_ratepool_valid_model(&model) != NGX_OK) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid \"%V\", give a model name "
                                   "pattern of up to %d characters where "
                                   "\"*\" stands for any, for example "
                                   "\"model=claude-opus-*\"",
                                   &value[i], RATEPOOL_NAME_MAX);
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (ngx_strcmp(value[i].data, "itpm_cache_reads=on") == 0
            || ngx_strcmp(value[i].data, "itpm_cache_reads=off") == 0)
        {
            cache_reads = (value[i].data[sizeof("itpm_cache_reads=o") - 1]
                           == 'n');
            continue;
        }

        rc = ngx_http_ratepool_parse_limit(&value[i], "rpm", &rpm);

        if (rc == NGX_DECLINED) {
            rc = ngx_http_ratepool_parse_limit(&value[i], "itpm", &itpm);
        }

        if (rc == NGX_DECLINED) {
            rc = ngx_http_ratepool_parse_limit(&value[i], "otpm", &otpm);
        }

        if (rc == NGX_DECLINED) {
            rc = ngx_http_ratepool_parse_limit(&value[i], "tpm", &tpm);
        }

        if (rc == NGX_OK) {
            continue;
        }

        if (rc == NGX_ERROR) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid limit \"%V\", use a positive number "
                               "per minute, for example \"rpm=50\"",
                               &value[i]);
            return NGX_CONF_ERROR;
        }

        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid parameter \"%V\", use \"model=\", "
                           "\"rpm=\", \"itpm=\", \"otpm=\", \"tpm=\" or "
                           "\"itpm_cache_reads=\"", &value[i]);
        return NGX_CONF_ERROR;
    }

    if (tpm && (itpm || otpm)) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"tpm=\" is one limit for input and output "
                           "tokens together, give it or \"itpm=\" and "
                           "\"otpm=\", not both");
        return NGX_CONF_ERROR;
    }

    org = ngx_http_ratepool_find_org(cf, pool, &value[1], &model, &index);
    if (org == NULL) {
        return NGX_CONF_ERROR;
    }

    if (org->declared) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           model.len ? "org \"%V\" is declared twice for "
                                       "model \"%V\""
                                     : "org \"%V\" is declared twice",
                           &value[1], &model);
        return NGX_CONF_ERROR;
    }

    org->declared = 1;
    org->rpm = rpm;
    org->itpm = itpm;
    org->otpm = otpm;
    org->tpm = tpm;
    org->cache_reads = cache_reads;

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_ratepool_read_secret(ngx_conf_t *cf, ngx_str_t *path,
    ngx_str_t *secret)
{
    return ngx_http_ratepool_read_small(cf, path, RATEPOOL_SECRET_MAX,
                                        "key_file", secret);
}


/* a file of at most max bytes, whole, its trailing white space left out */

static ngx_int_t
ngx_http_ratepool_read_small(ngx_conf_t *cf, ngx_str_t *path, size_t max,
    const char *what, ngx_str_t *secret)
{
    u_char           *buf;
    ssize_t           n;
    ngx_fd_t          fd;
    ngx_file_info_t   fi;

    if (ngx_conf_full_name(cf->cycle, path, 1) != NGX_OK) {
        return NGX_ERROR;
    }

    fd = ngx_open_file(path->data, NGX_FILE_RDONLY, NGX_FILE_OPEN, 0);

    if (fd == NGX_INVALID_FILE) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                           ngx_open_file_n " \"%V\" failed", path);
        return NGX_ERROR;
    }

    if (ngx_fd_info(fd, &fi) == NGX_FILE_ERROR
        || ngx_file_size(&fi) > (off_t) max)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "%s \"%V\" is not a file of at most %uz bytes",
                           what, path, max);
        (void) ngx_close_file(fd);
        return NGX_ERROR;
    }

    buf = ngx_pnalloc(cf->pool, max);
    if (buf == NULL) {
        (void) ngx_close_file(fd);
        return NGX_ERROR;
    }

    n = ngx_read_fd(fd, buf, max);

    (void) ngx_close_file(fd);

    if (n == -1) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                           ngx_read_fd_n " \"%V\" failed", path);
        return NGX_ERROR;
    }

    /* editors and "echo" add a trailing newline */
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r'
                     || buf[n - 1] == ' ' || buf[n - 1] == '\t'))
    {
        n--;
    }

    secret->data = buf;
    secret->len = n;

    return NGX_OK;
}


static ngx_int_t
ngx_http_ratepool_header_safe(ngx_str_t *s)
{
    return ngx_http_ratepool_header_bad(s->data, s->len) == s->len
           ? NGX_OK : NGX_ERROR;
}


/*
 * AWS credentials, in the form of ~/.aws/credentials (one profile):
 * "aws_access_key_id = ...", "aws_secret_access_key = ..." and, for
 * temporary ones, "aws_session_token = ..."; other lines are ignored.
 */

static ngx_int_t
ngx_http_ratepool_read_aws_keys(ngx_conf_t *cf, ngx_http_ratepool_key_t *key,
    ngx_str_t *path)
{
    u_char     *p, *end, *eol, *eq, *name_end, *v;
    ngx_str_t   text, name, value, *to;

    if (ngx_http_ratepool_read_secret(cf, path, &text) != NGX_OK) {
        return NGX_ERROR;
    }

    p = text.data;
    end = text.data + text.len;

    for ( /* void */ ; p < end; p = eol + 1) {
        eol = ngx_strlchr(p, end, '\n');
        if (eol == NULL) {
            eol = end;
        }

        eq = ngx_strlchr(p, eol, '=');
        if (eq == NULL || *p == '#' || *p == ';' || *p == '[') {
            continue;
        }

        name_end = eq;

        while (name_end > p && name_end[-1] == ' ') {
            name_end--;
        }

        v = eq + 1;

        while (v < eol && *v == ' ') {
            v++;
        }

        name.data = p;
        name.len = name_end - p;
        value.data = v;
        value.len = eol - v;

        while (value.len && (value.data[value.len - 1] == '\r'
                             || value.data[value.len - 1] == ' '))
        {
            value.len--;
        }

        if (name.len == sizeof("aws_access_key_id") - 1
            && ngx_strncasecmp(name.data, (u_char *) "aws_access_key_id",
                               name.len) == 0)
        {
            to = &key->aws_access_key;

        } else if (name.len == sizeof("aws_secret_access_key") - 1
                   && ngx_strncasecmp(name.data,
                                      (u_char *) "aws_secret_access_key",
                                      name.len) == 0)
        {
            to = &key->aws_secret;

        } else if (name.len == sizeof("aws_session_token") - 1
                   && ngx_strncasecmp(name.data,
                                      (u_char *) "aws_session_token",
                                      name.len) == 0)
        {
            to = &key->aws_token;

        } else {
            continue;
        }

        *to = value;
    }

    if (ngx_http_ratepool_header_safe(&key->aws_access_key) != NGX_OK
        || ngx_http_ratepool_header_safe(&key->aws_secret) != NGX_OK
        || ngx_http_ratepool_header_safe(&key->aws_token) != NGX_OK)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "aws_key_file \"%V\" of key \"%V\" has a "
                           "character that cannot be sent in a header",
                           path, &key->name);
        return NGX_ERROR;
    }

    if (key->aws_access_key.len == 0 || key->aws_secret.len == 0
        || key->aws_access_key.len > 128 || key->aws_secret.len > 120)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "aws_key_file \"%V\" of key \"%V\" needs "
                           "\"aws_access_key_id = ...\" and "
                           "\"aws_secret_access_key = ...\" lines", path,
                           &key->name);
        return NGX_ERROR;
    }

    return NGX_OK;
}


/*
 * provider=vertex: a service account's JSON key (the file Google's console
 * gives), whose private key signs the assertions traded at token_url for
 * access tokens (ngx_http_ratepool_token.c), over TLS verified against
 * token_ca or the system's CAs.
 */

static ngx_int_t
ngx_http_ratepool_google(ngx_conf_t *cf, ngx_http_ratepool_key_t *key,
    ngx_str_t *account, ngx_str_t *url, ngx_str_t *ca)
{
    BIO                         *bio;
    ngx_url_t                    u;
    ngx_str_t                    json, pem;
    ngx_uint_t                   https;
    ngx_pool_cleanup_t          *cln;
    ngx_http_ratepool_google_t  *g;

    g = ngx_pcalloc(cf->pool, sizeof(ngx_http_ratepool_google_t));
    if (g == NULL) {
        return NGX_ERROR;
    }

    key->google = g;

    if (ngx_http_ratepool_read_small(cf, account, 16384,
                                     "service_account_file", &json)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (ngx_http_ratepool_json_field(cf, &json, "client_email", &g->email)
            != NGX_OK
        || ngx_http_ratepool_json_field(cf, &json, "private_key_id", &g->kid)
           != NGX_OK
        || ngx_http_ratepool_json_field(cf, &json, "private_key", &pem)
           != NGX_OK
        || ngx_http_ratepool_header_safe(&g->email) != NGX_OK
        || ngx_http_ratepool_header_safe(&g->kid) != NGX_OK
        || g->email.len > 256 || g->kid.len > 128)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "service_account_file \"%V\" of key \"%V\" is "
                           "not a service account's JSON key (it needs "
                           "\"client_email\", \"private_key_id\" and "
                           "\"private_key\")", account, &key->name);
        return NGX_ERROR;
    }

    bio = BIO_new_mem_buf(pem.data, (int) pem.len);
    if (bio == NULL) {
        return NGX_ERROR;
    }

    g->pkey = PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL);
    BIO_free(bio);

    if (g->pkey == NULL || EVP_PKEY_base_id(g->pkey) != EVP_PKEY_RSA) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "the private_key of service_account_file \"%V\" "
                           "of key \"%V\" is not an RSA key in PEM",
                           account, &key->name);
        return NGX_ERROR;
    }

    cln = ngx_pool_cleanup_add(cf->pool, 0);
    if (cln == NULL) {
        return NGX_ERROR;
    }

    cln->handler = ngx_http_ratepool_free_pkey;
    cln->data = g->pkey;

    /* where tokens come from */

    g->token_url = *url;

    if (url->len > 8 && ngx_strncmp(url->data, "https://", 8) == 0) {
        https = 1;

    } else if (url->len > 7 && ngx_strncmp(url->data, "http://", 7) == 0) {
        https = 0;

    } else {
        goto bad_url;
    }

    ngx_memzero(&u, sizeof(ngx_url_t));

    u.url.data = url->data + (https ? 8 : 7);
    u.url.len = url->len - (https ? 8 : 7);
    u.default_port = https ? 443 : 80;
    u.uri_part = 1;

    if (ngx_parse_url(cf->pool, &u) != NGX_OK || u.naddrs == 0
        || u.uri.len == 0)
    {
        goto bad_url;
    }

    g->token_addrs = u.addrs;
    g->token_path = u.uri;
    g->token_host = u.host;

    /* the name alone, NUL-terminated for OpenSSL; an address sends no SNI */
    g->token_name.len = u.host.len;
    g->token_name.data = ngx_pnalloc(cf->pool, u.host.len + 1);
    if (g->token_name.data == NULL) {
        return NGX_ERROR;
    }

    ngx_memcpy(g->token_name.data, u.host.data, u.host.len);
    g->token_name.data[u.host.len] = '\0';

    g->token_sni = (u.host.len && u.host.data[0] != '['
                    && ngx_inet_addr(u.host.data, u.host.len) == INADDR_NONE);

    if (!u.no_port && u.port != u.default_port) {
        /* Host: "host:port" */
        g->token_host.len = u.url.len - u.uri.len;
        g->token_host.data = u.url.data;
    }

    if (!https) {
        return NGX_OK;
    }

#if (NGX_HTTP_SSL)

    g->ssl = ngx_http_ratepool_tls_client(cf, ca, NULL, NULL);

    return g->ssl ? NGX_OK : NGX_ERROR;

#else

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "\"token_url=%V\" of key \"%V\" needs nginx with "
                       "TLS", url, &key->name);
    return NGX_ERROR;

#endif

bad_url:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid \"token_url=%V\" of key \"%V\", use "
                       "\"token_url=https://oauth2.googleapis.com/token\"",
                       url, &key->name);
    return NGX_ERROR;
}


#if (NGX_HTTP_SSL)

/*
 * A TLS client's context: TLS 1.2 or 1.3, the peer verified against ca
 * (the system's CAs if empty), and a certificate of its own if given.
 */

ngx_ssl_t *
ngx_http_ratepool_tls_client(ngx_conf_t *cf, ngx_str_t *ca, ngx_str_t *cert,
    ngx_str_t *key)
{
    ngx_str_t            trusted;
    ngx_ssl_t           *ssl;
    ngx_pool_cleanup_t  *cln;

    ssl = ngx_pcalloc(cf->pool, sizeof(ngx_ssl_t));
    if (ssl == NULL) {
        return NULL;
    }

    ssl->log = cf->log;

    if (ngx_ssl_create(ssl, NGX_SSL_TLSv1_2|NGX_SSL_TLSv1_3, NULL) != NGX_OK) {
        return NULL;
    }

    cln = ngx_pool_cleanup_add(cf->pool, 0);
    if (cln == NULL) {
        ngx_ssl_cleanup_ctx(ssl);
        return NULL;
    }

    cln->handler = ngx_ssl_cleanup_ctx;
    cln->data = ssl;

    if (ca && ca->len) {
        trusted = *ca;

    } else {
        ngx_str_set(&trusted, RATEPOOL_CA_FILE);
    }

    if (ngx_ssl_trusted_certificate(cf, ssl, &trusted, 4) != NGX_OK) {
        return NULL;
    }

    if (cert && cert->len
        && ngx_ssl_certificate(cf, ssl, cert, key, NULL) != NGX_OK)
    {
        return NULL;
    }

    return ssl;
}

#endif


/* a string member of a JSON document, decoded */

static ngx_int_t
ngx_http_ratepool_json_field(ngx_conf_t *cf, ngx_str_t *json,
    const char *name, ngx_str_t *value)
{
    const u_char  *from, *to;

    if (!ratepool_json_top_string(json->data, json->len, name,
                                  ngx_strlen(name), &from, &to)
        || to == from)
    {
        return NGX_ERROR;
    }

    value->data = ngx_pnalloc(cf->pool, to - from);
    if (value->data == NULL) {
        return NGX_ERROR;
    }

    value->len = ratepool_json_unescape(from, to, value->data, to - from);

    return NGX_OK;
}


static void
ngx_http_ratepool_free_pkey(void *data)
{
    EVP_PKEY_free(data);
}


/*
 * ratepool_price PATTERN input=USD output=USD [cache_write=USD]
 *                [cache_read=USD]
 *
 * Dollars per million tokens.  A request is priced by the first pattern
 * its model matches; without cache prices, Anthropic's multiples of the
 * input price are used: 1.25 for a write (5 minutes), 0.1 for a read.
 */

char *
ngx_http_ratepool_price(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_ratepool_main_conf_t *rmcf = conf;

    size_t                      len;
    uint64_t                   *field;
    ngx_str_t                  *value;
    ngx_uint_t                  n, i, seen;
    ngx_http_ratepool_price_t  *price, *prices;

    static const char  *names[] = { "input=", "output=", "cache_write=",
                                    "cache_read=" };

    value = cf->args->elts;
    prices = rmcf->prices.elts;

    if (ngx_http_ratepool_valid_model(&value[1]) != NGX_OK) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid model pattern \"%V\", use up to %d "
                           "characters of model names and \"*\", such as "
                           "\"claude-sonnet-4*\"", &value[1],
                           RATEPOOL_NAME_MAX);
        return NGX_CONF_ERROR;
    }

    for (n = 0; n < rmcf->prices.nelts; n++) {
        if (ngx_http_ratepool_str_eq(&prices[n].pattern, &value[1])) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "model pattern \"%V\" is priced twice",
                               &value[1]);
            return NGX_CONF_ERROR;
        }
    }

    price = ngx_array_push(&rmcf->prices);
    if (price == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memzero(price, sizeof(ngx_http_ratepool_price_t));
    price->pattern = value[1];
    price->index = rmcf->prices.nelts - 1;
    seen = 0;

    for (n = 2; n < cf->args->nelts; n++) {

        for (i = 0; i < 4; i++) {
            len = ngx_strlen(names[i]);

            if (value[n].len > len
                && ngx_strncmp(value[n].data, names[i], len) == 0)
            {
                break;
            }
        }

        field = i == 0 ? &price->price.input : i == 1 ? &price->price.output
                : i == 2 ? &price->price.cache_write
                : &price->price.cache_read;

        if (i == 4
            || !ratepool_decimal_parse(value[n].data + len,
                                       value[n].len - len, 3,
                                       RATEPOOL_PRICE_MAX, field))
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid price \"%V\" of \"%V\", use "
                               "\"input=\", \"output=\", \"cache_write=\" "
                               "or \"cache_read=\" and dollars per million "
                               "tokens, such as \"input=3 output=15\"",
                               &value[n], &value[1]);
            return NGX_CONF_ERROR;
        }

        seen |= 1 << i;
    }

    if ((seen & 3) != 3) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "model pattern \"%V\" needs an input and an "
                           "output price, such as \"input=3 output=15\"",
                           &value[1]);
        return NGX_CONF_ERROR;
    }

    if (!(seen & 4)) {
        price->price.cache_write = price->price.input * 5 / 4;
    }

    if (!(seen & 8)) {
        price->price.cache_read = price->price.input / 10;
    }

    return NGX_CONF_OK;
}


/* NAME=DOLLARS, with cents: NGX_DECLINED if it is another parameter */

static ngx_int_t
ngx_http_ratepool_parse_money(ngx_str_t *value, const char *name,
    uint64_t *nano)
{
    size_t  len;

    len = ngx_strlen(name);

    if (value->len < len || ngx_strncmp(value->data, name, len) != 0) {
        return NGX_DECLINED;
    }

    /* up to a billion dollars, counted in nano-dollars */
    if (!ratepool_decimal_parse(value->data + len, value->len - len, 9,
                                (uint64_t) 1000000000 * RATEPOOL_NANO_PER_USD,
                                nano)
        || *nano == 0)
    {
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* ratepool_model NAME bedrock=ID */

char *
ngx_http_ratepool_model(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_ratepool_main_conf_t *rmcf = conf;

    size_t                      i;
    ngx_str_t                  *value, *id;
    ngx_uint_t                  n;
    ngx_http_ratepool_model_t  *model, *models;

    value = cf->args->elts;
    models = rmcf->models.elts;

    for (n = 0; n < rmcf->models.nelts; n++) {
        if (ngx_http_ratepool_str_eq(&models[n].name, &value[1])) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "model \"%V\" is declared twice", &value[1]);
            return NGX_CONF_ERROR;
        }
    }

    model = ngx_array_push(&rmcf->models);
    if (model == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memzero(model, sizeof(ngx_http_ratepool_model_t));
    model->name = value[1];

    for (n = 2; n < cf->args->nelts; n++) {

        if (ngx_strncmp(value[n].data, "bedrock=", 8) == 0) {
            id = &model->bedrock;
            id->data = value[n].data + 8;
            id->len = value[n].len - 8;

        } else if (ngx_strncmp(value[n].data, "vertex=", 7) == 0) {
            id = &model->vertex;
            id->data = value[n].data + 7;
            id->len = value[n].len - 7;

        } else {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid parameter \"%V\", use "
                               "\"bedrock=MODEL_ID\" or "
                               "\"vertex=MODEL_ID\"", &value[n]);
            return NGX_CONF_ERROR;
        }

        /* it goes into a JSON string as it is */
        for (i = 0; i < id->len; i++) {
            if (id->data[i] <= ' ' || id->data[i] >= 0x7f
                || id->data[i] == '"' || id->data[i] == '\\')
            {
                break;
            }
        }

        if (id->len == 0 || id->len > 256 || i < id->len) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid model id in \"%V\", use one such "
                               "as \"bedrock=us.anthropic.claude-sonnet-4-"
                               "6-v1:0\"", &value[n]);
            return NGX_CONF_ERROR;
        }
    }

    if (value[1].len > RATEPOOL_MODEL_MAX) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "model name \"%V\" is longer than %d",
                           &value[1], RATEPOOL_MODEL_MAX);
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


/*
 * ratepool_bedrock_betas FLAG ...: the anthropic-beta flags a client may
 * have passed to InvokeModel, which refuses a request with one it does
 * not know.
 */

char *
ngx_http_ratepool_bedrock_betas(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_ratepool_main_conf_t *rmcf = conf;

    size_t      j;
    ngx_str_t  *value, *flag;
    ngx_uint_t  i;

    value = cf->args->elts;

    for (i = 1; i < cf->args->nelts; i++) {

        for (j = 0; j < value[i].len; j++) {
            if (!((value[i].data[j] >= 'a' && value[i].data[j] <= 'z')
                  || (value[i].data[j] >= '0' && value[i].data[j] <= '9')
                  || value[i].data[j] == '-'))
            {
                break;
            }
        }

        if (value[i].len == 0 || value[i].len > 64 || j < value[i].len) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid beta flag \"%V\", use one such as "
                               "\"interleaved-thinking-2025-05-14\"",
                               &value[i]);
            return NGX_CONF_ERROR;
        }

        flag = ngx_array_push(&rmcf->bedrock_betas);
        if (flag == NULL) {
            return NGX_CONF_ERROR;
        }

        *flag = value[i];
    }

    return NGX_CONF_OK;
}


static void
ngx_http_ratepool_sha256(u_char *data, size_t len, u_char digest[32])
{
    unsigned int  n;

    n = 32;

    if (EVP_Digest(data, len, digest, &n, EVP_sha256(), NULL) != 1) {
        ngx_memzero(digest, 32);
    }
}


/*
 * ratepool_key NAME org=ORG provider=anthropic|openai [fallback=N]
 *              server=HOST[:PORT]
 *              key=SECRET | key_file=PATH
 */

char *
ngx_http_ratepool_key(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_ratepool_pool_t *pool = conf;

    u_char                        digest[32], *p;
    size_t                        i;
    ngx_str_t                    *value, secret, org_name, path, no_model,
                                  account, token_url, token_ca;
    ngx_url_t                     u;
    ngx_int_t                     rc;
    ngx_uint_t                    n, index;
    ngx_http_ratepool_key_t      *key, *keys;
    ngx_http_upstream_server_t   *us;
    ngx_http_upstream_srv_conf_t *uscf;
    ngx_http_ratepool_provider_t *provider;
    ngx_http_ratepool_main_conf_t *rmcf;

    value = cf->args->elts;

    if (ngx_http_ratepool_check_name(cf, &value[1]) != NGX_CONF_OK) {
        return NGX_CONF_ERROR;
    }

    if (pool->keys == NULL) {
        pool->keys = ngx_array_create(cf->pool, 4,
                                      sizeof(ngx_http_ratepool_key_t));
        if (pool->keys == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    keys = pool->keys->elts;

    for (n = 0; n < pool->keys->nelts; n++) {
        if (keys[n].name.len == value[1].len
            && ngx_strncmp(keys[n].name.data, value[1].data, value[1].len)
               == 0)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "key \"%V\" is declared twice", &value[1]);
            return NGX_CONF_ERROR;
        }
    }

    if (pool->keys->nelts == RATEPOOL_KEYS_MAX) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "too many keys in one pool, at most %d",
                           RATEPOOL_KEYS_MAX);
        return NGX_CONF_ERROR;
    }

    key = ngx_array_push(pool->keys);
    if (key == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memzero(key, sizeof(ngx_http_ratepool_key_t));
    key->name = value[1];
    key->provider = &ngx_http_ratepool_providers[0];

    ngx_str_null(&org_name);
    ngx_str_null(&secret);
    ngx_str_null(&account);
    ngx_str_null(&token_url);
    ngx_str_null(&token_ca);

    for (n = 2; n < cf->args->nelts; n++) {

        if (ngx_strncmp(value[n].data, "org=", 4) == 0) {
            org_name.data = value[n].data + 4;
            org_name.len = value[n].len - 4;

            if (ngx_http_ratepool_check_name(cf, &org_name) != NGX_CONF_OK) {
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (ngx_strncmp(value[n].data, "provider=", 9) == 0) {

            for (provider = ngx_http_ratepool_providers;
                 provider->name.len;
                 provider++)
            {
                if (value[n].len - 9 == provider->name.len
                    && ngx_strncmp(value[n].data + 9, provider->name.data,
                                   provider->name.len)
                       == 0)
                {
                    key->provider = provider;
                    break;
                }
            }

            if (provider->name.len == 0) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid provider \"%V\", use "
                                   "\"provider=anthropic\", "
                                   "\"provider=openai\", "
                                   "\"provider=azure\", "
                                   "\"provider=bedrock\", "
                                   "\"provider=bedrock-invoke\" or "
                                   "\"provider=vertex\"", &value[n]);
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (ngx_strncmp(value[n].data, "fallback=", 9) == 0) {
            rc = ngx_atoi(value[n].data + 9, value[n].len - 9);

            if (rc == NGX_ERROR || rc > 9) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid \"%V\", use \"fallback=N\" "
                                   "from 0 (preferred, the default) to 9 "
                                   "(the last resort)", &value[n]);
                return NGX_CONF_ERROR;
            }

            key->fallback = (ngx_uint_t) rc;
            continue;
        }

        if (ngx_strncmp(value[n].data, "server=", 7) == 0) {
            key->server.data = value[n].data + 7;
            key->server.len = value[n].len - 7;
            continue;
        }

        if (ngx_strncmp(value[n].data, "key=", 4) == 0) {
            secret.data = value[n].data + 4;
            secret.len = value[n].len - 4;
            continue;
        }

        if (ngx_strncmp(value[n].data, "region=", 7) == 0) {
            key->region.data = value[n].data + 7;
            key->region.len = value[n].len - 7;

            if (ngx_http_ratepool_valid_name(&key->region) != NGX_OK) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid \"%V\" of key \"%V\", use "
                                   "\"region=us-east-1\"", &value[n],
                                   &key->name);
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (ngx_strncmp(value[n].data, "project=", 8) == 0) {
            key->project.data = value[n].data + 8;
            key->project.len = value[n].len - 8;

            if (ngx_http_ratepool_valid_name(&key->project) != NGX_OK) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid \"%V\" of key \"%V\", use "
                                   "\"project=my-project\"", &value[n],
                                   &key->name);
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (ngx_strncmp(value[n].data, "service_account_file=", 21) == 0) {
            account.data = value[n].data + 21;
            account.len = value[n].len - 21;
            continue;
        }

        if (ngx_strncmp(value[n].data, "token_url=", 10) == 0) {
            token_url.data = value[n].data + 10;
            token_url.len = value[n].len - 10;
            continue;
        }

        if (ngx_strncmp(value[n].data, "token_ca=", 9) == 0) {
            token_ca.data = value[n].data + 9;
            token_ca.len = value[n].len - 9;
            continue;
        }

        if (ngx_strncmp(value[n].data, "aws_key_file=", 13) == 0) {
            path.data = value[n].data + 13;
            path.len = value[n].len - 13;

            if (ngx_http_ratepool_read_aws_keys(cf, key, &path) != NGX_OK) {
                return NGX_CONF_ERROR;
            }

            secret = key->aws_secret;
            continue;
        }

        if (ngx_strncmp(value[n].data, "key_file=", 9) == 0) {
            path.data = value[n].data + 9;
            path.len = value[n].len - 9;

            if (ngx_http_ratepool_read_secret(cf, &path, &secret) != NGX_OK) {
                return NGX_CONF_ERROR;
            }

            continue;
        }

        /* never echo what may be a secret */
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid parameter %ui of key \"%V\", use "
                           "\"org=\", \"provider=\", \"fallback=\", "
                           "\"server=\", \"key=\", \"key_file=\", "
                           "\"region=\", \"aws_key_file=\", \"project=\", "
                           "\"service_account_file=\", \"token_url=\" or "
                           "\"token_ca=\"", n, &key->name);
        return NGX_CONF_ERROR;
    }

    if (key->provider->service == RATEPOOL_SERVICE_VERTEX) {
        if (key->region.len == 0 || key->project.len == 0
            || account.len == 0)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "key \"%V\" of provider vertex needs "
                               "\"region=\", \"project=\" and "
                               "\"service_account_file=\"", &key->name);
            return NGX_CONF_ERROR;
        }

        if (token_url.len == 0) {
            ngx_str_set(&token_url, "https://oauth2.googleapis.com/token");
        }

        if (ngx_http_ratepool_google(cf, key, &account, &token_url,
                                     &token_ca)
            != NGX_OK)
        {
            return NGX_CONF_ERROR;
        }

        secret = key->google->email;

        rmcf = ngx_http_conf_get_module_main_conf(cf,
                                                  ngx_http_ratepool_module);
        rmcf->google_keys++;

        if (key->server.len == 0) {
            if (key->region.len == 6
                && ngx_strncmp(key->region.data, "global", 6) == 0)
            {
                ngx_str_set(&key->server, "aiplatform.googleapis.com");

            } else {
                key->server.len = sizeof("-aiplatform.googleapis.com") - 1
                                  + key->region.len;
                key->server.data = ngx_pnalloc(cf->pool, key->server.len);
                if (key->server.data == NULL) {
                    return NGX_CONF_ERROR;
                }

                ngx_sprintf(key->server.data, "%V-aiplatform.googleapis.com",
                            &key->region);
            }
        }

    } else if (account.len || token_url.len || token_ca.len
               || key->project.len)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "key \"%V\" has \"project=\" or a service "
                           "account, which only \"provider=vertex\" takes",
                           &key->name);
        return NGX_CONF_ERROR;
    }

    if (secret.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "key \"%V\" has no secret, add \"key_file=PATH\"",
                           &key->name);
        return NGX_CONF_ERROR;
    }

    key->credential = key->aws_secret.len ? RATEPOOL_CREDENTIAL_SIGV4
                                          : key->provider->credential;

    if (key->aws_secret.len
        && key->provider->service == RATEPOOL_SERVICE_DIRECT)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "key \"%V\" has \"aws_key_file=\", which only "
                           "\"provider=bedrock\" takes", &key->name);
        return NGX_CONF_ERROR;
    }

    if (key->provider->service == RATEPOOL_SERVICE_BEDROCK
        || key->provider->service == RATEPOOL_SERVICE_INVOKE)
    {
        if (key->region.len == 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "key \"%V\" of provider bedrock has no "
                               "region, add \"region=us-east-1\"",
                               &key->name);
            return NGX_CONF_ERROR;
        }

        if (key->server.len == 0) {
            key->server.len = sizeof("bedrock-runtime..amazonaws.com") - 1
                              + key->region.len;
            key->server.data = ngx_pnalloc(cf->pool, key->server.len);
            if (key->server.data == NULL) {
                return NGX_CONF_ERROR;
            }

            ngx_sprintf(key->server.data, "bedrock-runtime.%V.amazonaws.com",
                        &key->region);
        }
    }

    i = ngx_http_ratepool_header_bad(secret.data, secret.len);

    if (i < secret.len) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "the secret of key \"%V\" has a character "
                           "that cannot be sent in a header, at "
                           "offset %uz", &key->name, i);
        return NGX_CONF_ERROR;
    }

    if (key->server.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "key \"%V\" has no server, add "
                           "\"server=api.anthropic.com:443\"", &key->name);
        return NGX_CONF_ERROR;
    }

    ngx_memzero(&u, sizeof(ngx_url_t));

    u.url = key->server;
    u.default_port = 443;

    if (ngx_parse_url(cf->pool, &u) != NGX_OK) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "%s in server \"%V\" of key \"%V\"",
                           u.err ? u.err : "invalid address", &key->server,
                           &key->name);
        return NGX_CONF_ERROR;
    }

    if (u.uri.len || u.naddrs == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid server \"%V\" of key \"%V\", use "
                           "\"server=HOST[:PORT]\"", &key->server,
                           &key->name);
        return NGX_CONF_ERROR;
    }

    key->addrs = u.addrs;
    key->naddrs = u.naddrs;
    key->port = u.port;
    key->host = (u.no_port || u.port == 443) ? u.host : key->server;

    /* nginx wants a server in every upstream: each key stands for one */

    uscf = ngx_http_conf_get_module_srv_conf(cf, ngx_http_upstream_module);

    us = ngx_array_push(uscf->servers);
    if (us == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memzero(us, sizeof(ngx_http_upstream_server_t));
    us->name = key->server;
    us->addrs = u.addrs;
    us->naddrs = u.naddrs;
    us->weight = 1;

    if (org_name.len == 0) {
        org_name = key->name;   /* a key of its own org */
    }

    ngx_str_null(&no_model);

    if (ngx_http_ratepool_find_org(cf, pool, &org_name, &no_model, &index)
        == NULL)
    {
        return NGX_CONF_ERROR;
    }

    key->org = index;

    key->dialect = key->provider->dialect;

    if (key->credential == RATEPOOL_CREDENTIAL_X_API_KEY) {
        key->x_api_key = secret;

    } else if (key->credential == RATEPOOL_CREDENTIAL_API_KEY) {
        key->api_key = secret;

    } else if (key->credential == RATEPOOL_CREDENTIAL_SIGV4
               || key->credential == RATEPOOL_CREDENTIAL_GOOGLE)
    {
        /* for each try: its signature, or the token of the moment */

    } else {
        key->authorization.len = sizeof("Bearer ") - 1 + secret.len;
        key->authorization.data = ngx_pnalloc(cf->pool,
                                              key->authorization.len);
        if (key->authorization.data == NULL) {
            return NGX_CONF_ERROR;
        }

        p = ngx_cpymem(key->authorization.data, "Bearer ",
                       sizeof("Bearer ") - 1);
        ngx_memcpy(p, secret.data, secret.len);
    }

    ngx_http_ratepool_sha256(secret.data, secret.len, digest);
    ngx_hex_dump(key->fingerprint, digest, RATEPOOL_FINGERPRINT_LEN / 2);

    return NGX_CONF_OK;
}


/*
 * ratepool_workspace NAME [rpm=N] [itpm=N] [otpm=N] [daily_tokens=N]
 *                    [monthly_tokens=N]
 */

char *
ngx_http_ratepool_workspace(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_ratepool_main_conf_t *rmcf = conf;

    ngx_int_t                       rc;
    ngx_str_t                      *value;
    ngx_uint_t                      i;
    ngx_http_ratepool_workspace_t  *ws;

    value = cf->args->elts;

    if (ngx_http_ratepool_check_name(cf, &value[1]) != NGX_CONF_OK) {
        return NGX_CONF_ERROR;
    }

    ws = rmcf->workspaces.elts;

    for (i = 0; i < rmcf->workspaces.nelts; i++) {
        if (ws[i].name.len == value[1].len
            && ngx_strncmp(ws[i].name.data, value[1].data, value[1].len) == 0)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "workspace \"%V\" is declared twice",
                               &value[1]);
            return NGX_CONF_ERROR;
        }
    }

    ws = ngx_array_push(&rmcf->workspaces);
    if (ws == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memzero(ws, sizeof(ngx_http_ratepool_workspace_t));
    ws->name = value[1];
    ws->weight = 1;

    for (i = 2; i < cf->args->nelts; i++) {

        rc = ngx_http_ratepool_parse_limit(&value[i], "weight", &ws->weight);

        if (rc == NGX_OK && ws->weight > 100) {
            rc = NGX_ERROR;
        }

        if (rc == NGX_DECLINED) {
            rc = ngx_http_ratepool_parse_limit(&value[i], "rpm", &ws->rpm);
        }

        if (rc == NGX_DECLINED) {
            rc = ngx_http_ratepool_parse_limit(&value[i], "itpm", &ws->itpm);
        }

        if (rc == NGX_DECLINED) {
            rc = ngx_http_ratepool_parse_limit(&value[i], "otpm", &ws->otpm);
        }

        if (rc == NGX_DECLINED) {
            rc = ngx_http_ratepool_parse_limit(&value[i], "daily_tokens",
                                               &ws->daily_tokens);
        }

        if (rc == NGX_DECLINED) {
            rc = ngx_http_ratepool_parse_limit(&value[i], "monthly_tokens",
                                               &ws->monthly_tokens);
        }

        if (rc == NGX_DECLINED) {
            rc = ngx_http_ratepool_parse_money(&value[i], "daily_usd=",
                                               &ws->daily_cost);
        }

        if (rc == NGX_DECLINED) {
            rc = ngx_http_ratepool_parse_money(&value[i], "monthly_usd=",
                                               &ws->monthly_cost);
        }

        if (rc == NGX_OK) {
            continue;
        }

        if (rc == NGX_ERROR) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid limit \"%V\", use a positive number, "
                               "for example \"rpm=200\", "
                               "\"daily_tokens=5000000\" or "
                               "\"daily_usd=25.50\", and a weight of "
                               "1 to 100", &value[i]);
            return NGX_CONF_ERROR;
        }

        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid parameter \"%V\", use \"rpm=\", "
                           "\"itpm=\", \"otpm=\", \"daily_tokens=\", "
                           "\"monthly_tokens=\", \"daily_usd=\", "
                           "\"monthly_usd=\" or \"weight=\"",
                           &value[i]);
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


/* ratepool_client WORKSPACE sha256:HEX [name=NAME] */

char *
ngx_http_ratepool_client(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_ratepool_main_conf_t *rmcf = conf;

    u_char                      *hex;
    ngx_int_t                    hi, lo;
    ngx_str_t                   *value;
    ngx_uint_t                   i;
    ngx_http_ratepool_client_t  *client;

    value = cf->args->elts;

    if (value[2].len != 7 + 64 || ngx_strncmp(value[2].data, "sha256:", 7))
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid client token hash for workspace \"%V\", "
                           "use \"sha256:\" and the 64 hex digits of "
                           "\"printf %%s TOKEN | sha256sum\"", &value[1]);
        return NGX_CONF_ERROR;
    }

    client = ngx_array_push(&rmcf->clients);
    if (client == NULL) {
        return NGX_CONF_ERROR;
    }

    client->workspace_name = value[1];
    hex = value[2].data + 7;

    /* unnamed, it is known by its hash's first digits, as in nginx.conf */
    client->name.data = value[2].data;
    client->name.len = 7 + RATEPOOL_FINGERPRINT_LEN;

    if (cf->args->nelts == 4) {
        if (value[3].len <= 5 || ngx_strncmp(value[3].data, "name=", 5) != 0)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid parameter \"%V\" of a client of "
                               "workspace \"%V\", use \"name=NAME\" to "
                               "name the person or job it is",
                               &value[3], &value[1]);
            return NGX_CONF_ERROR;
        }

        client->name.data = value[3].data + 5;
        client->name.len = value[3].len - 5;

        if (ngx_http_ratepool_check_name(cf, &client->name) != NGX_CONF_OK) {
            return NGX_CONF_ERROR;
        }
    }

    for (i = 0; i < 32; i++) {
        hi = ngx_hextoi(&hex[i * 2], 1);
        lo = ngx_hextoi(&hex[i * 2 + 1], 1);

        if (hi == NGX_ERROR || lo == NGX_ERROR) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid hex digit in the client token hash "
                               "for workspace \"%V\"", &value[1]);
            return NGX_CONF_ERROR;
        }

        client->digest[i] = (u_char) (hi * 16 + lo);
    }

    /* an example's placeholder, left in: no token has such a hash */
    for (i = 1; i < 64 && hex[i] == hex[0]; i++) { /* void */ }

    if (i == 64) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "the client token hash for workspace \"%V\" is "
                           "a placeholder, one digit repeated; put in the "
                           "hash of a real token: printf %%s TOKEN | "
                           "sha256sum", &value[1]);
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


/*
 * ratepool_pass http://POOL | https://POOL
 *
 * Applies the proxy settings a pool needs, so that nobody has to copy
 * them: they are parsed as if written in the location.
 */

char *
ngx_http_ratepool_pass(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_ratepool_loc_conf_t *rlcf = conf;

    char                            *rv;
    u_char                          *p;
    size_t                           scheme;
    ngx_buf_t                        b;
    ngx_str_t                       *value, *hidden, name, text, ca;
    ngx_uint_t                       i, verify;
    ngx_array_t                     *saved_args;
    ngx_conf_file_t                  conf_file, *saved_file;
    ngx_http_ratepool_loc_conf_t   **pass;
    ngx_http_ratepool_main_conf_t   *rmcf;

    if (rlcf->url.len) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (ngx_strncmp(value[1].data, "http://", 7) == 0) {
        scheme = 7;

    } else if (ngx_strncmp(value[1].data, "https://", 8) == 0) {
        scheme = 8;

    } else {
        scheme = 0;
    }

    name.data = value[1].data + scheme;
    name.len = value[1].len - scheme;

    if (scheme == 0 || ngx_http_ratepool_valid_name(&name) != NGX_OK) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid pool \"%V\", use \"https://NAME\" or "
                           "\"http://NAME\" where NAME is an upstream with "
                           "the \"ratepool\" directive", &value[1]);
        return NGX_CONF_ERROR;
    }

    ngx_str_set(&ca, RATEPOOL_CA_FILE);
    verify = 1;

    if (cf->args->nelts == 3) {
        if (scheme == 7) {
            return "takes TLS parameters only with \"https://\"";
        }

        if (ngx_strcmp(value[2].data, "ssl_verify=off") == 0) {
            verify = 0;

        } else if (ngx_strncmp(value[2].data, "ssl_trusted_certificate=", 24)
                   == 0 && value[2].len > 24)
        {
            ca.data = value[2].data + 24;
            ca.len = value[2].len - 24;

        } else {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid parameter \"%V\", use "
                               "\"ssl_trusted_certificate=PATH\" or "
                               "\"ssl_verify=off\"", &value[2]);
            return NGX_CONF_ERROR;
        }
    }

    rlcf->url = value[1];
    rlcf->file = cf->conf_file->file.name;
    rlcf->line = cf->conf_file->line;

    text.len = sizeof(ngx_http_ratepool_proxy_conf) + value[1].len;

    for (i = 0; (hidden = ngx_http_ratepool_learned_header(i)); i++) {
        text.len += sizeof("proxy_hide_header ;") - 1 + hidden->len;
    }

#if (NGX_HTTP_SSL)
    text.len += sizeof(ngx_http_ratepool_tls_conf) + ca.len;
#else
    if (scheme == 8) {
        return "needs nginx built with the SSL module for \"https://\"";
    }
#endif

    text.data = ngx_pnalloc(cf->pool, text.len);
    if (text.data == NULL) {
        return NGX_CONF_ERROR;
    }

    p = ngx_sprintf(text.data, ngx_http_ratepool_proxy_conf, &value[1]);

    /* the pool's numbers are not one org's: see ngx_http_ratepool_learn() */
    for (i = 0; (hidden = ngx_http_ratepool_learned_header(i)); i++) {
        p = ngx_sprintf(p, "proxy_hide_header %V;", hidden);
    }

#if (NGX_HTTP_SSL)
    if (scheme == 8) {
        p = verify ? ngx_sprintf(p, ngx_http_ratepool_tls_conf, &ca)
                   : ngx_sprintf(p, ngx_http_ratepool_tls_noverify_conf);
    }
#endif

    text.len = p - text.data;

    ngx_memzero(&conf_file, sizeof(ngx_conf_file_t));
    ngx_memzero(&b, sizeof(ngx_buf_t));

    b.start = text.data;
    b.pos = text.data;
    b.last = text.data + text.len;
    b.end = b.last;
    b.temporary = 1;

    conf_file.file.fd = NGX_INVALID_FILE;
    conf_file.buffer = &b;

    saved_file = cf->conf_file;
    saved_args = cf->args;

    cf->conf_file = &conf_file;
    cf->args = ngx_array_create(cf->temp_pool, 4, sizeof(ngx_str_t));
    if (cf->args == NULL) {
        return NGX_CONF_ERROR;
    }

    rv = ngx_conf_parse(cf, NULL);

    cf->conf_file = saved_file;
    cf->args = saved_args;

    if (rv != NGX_CONF_OK) {
        return "cannot apply its proxy settings: remove \"proxy_pass\", "
               "\"proxy_buffering\", \"proxy_request_buffering\", "
               "\"proxy_http_version\", \"proxy_next_upstream\" and "
               "\"proxy_ssl_*\" from this location, ratepool_pass sets them";
    }

    rmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_ratepool_module);

    pass = ngx_array_push(&rmcf->passes);
    if (pass == NULL) {
        return NGX_CONF_ERROR;
    }

    *pass = rlcf;

    return NGX_CONF_OK;
}


char *
ngx_http_ratepool_status(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_core_loc_conf_t  *clcf;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);

    if (clcf->handler) {
        return "is duplicate or conflicts with another content handler";
    }

    clcf->handler = ngx_http_ratepool_status_handler;

    return NGX_CONF_OK;
}

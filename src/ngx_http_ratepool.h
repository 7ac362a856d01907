
/*
 * Copyright (C) ratepool authors
 */


#ifndef _NGX_HTTP_RATEPOOL_H_INCLUDED_
#define _NGX_HTTP_RATEPOOL_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <openssl/evp.h>

#include "ratepool_bucket.h"
#include "ratepool_limits.h"
#include "ratepool_pick.h"
#include "ratepool_parse.h"
#include "ratepool_dialect.h"
#include "ratepool_usage.h"
#include "ratepool_budget.h"
#include "ratepool_request.h"
#include "ratepool_home.h"
#include "ratepool_resp.h"
#include "ratepool_script.h"


#define RATEPOOL_NAME_MAX           64
#define RATEPOOL_ENTRY_NAME_MAX     (2 * RATEPOOL_NAME_MAX + 1)
#define RATEPOOL_KEYS_MAX           64      /* per pool: a bitmap of tries */
#define RATEPOOL_FINGERPRINT_LEN    12      /* hex digits of sha256 */
#define RATEPOOL_OUTPUT_RESERVE     4096    /* default output reservation */
#define RATEPOOL_COOLDOWN_MAX_MS    3600000 /* an hour, at most */

/* the APIs clients speak */
#define RATEPOOL_DIALECT_ANTHROPIC  0
#define RATEPOOL_DIALECT_OPENAI     1

/* how a provider takes its key */
#define RATEPOOL_CREDENTIAL_X_API_KEY  0
#define RATEPOOL_CREDENTIAL_BEARER     1
#define RATEPOOL_CREDENTIAL_API_KEY    2   /* Azure's */
#define RATEPOOL_CREDENTIAL_SIGV4      3   /* AWS's signature */
#define RATEPOOL_CREDENTIAL_GOOGLE     4   /* an access token, fetched */
#define RATEPOOL_TOKEN_MAX             2048
#define RATEPOOL_AMZ_DATE_LEN          16  /* 20261207T120000Z */

/* where a key's requests go, and in which form */
#define RATEPOOL_SERVICE_DIRECT        0   /* as the client sent them */
#define RATEPOOL_SERVICE_BEDROCK       1   /* Bedrock's Messages API */
#define RATEPOOL_SERVICE_INVOKE        2   /* Bedrock's InvokeModel */
#define RATEPOOL_SERVICE_VERTEX        3   /* Google's Vertex AI */

#define RATEPOOL_ENTRY_ORG          1
#define RATEPOOL_ENTRY_KEY          2
#define RATEPOOL_ENTRY_WORKSPACE    3
#define RATEPOOL_ENTRY_POOL         4
#define RATEPOOL_ENTRY_QUEUE        5
#define RATEPOOL_ENTRY_CLIENT       6
#define RATEPOOL_ENTRY_SPEND        7

#define RATEPOOL_REDIS_FAIL_LOCAL   0     /* redis_fail=: while Redis is */
#define RATEPOOL_REDIS_FAIL_OPEN    1     /* down, this gateway's share, */
#define RATEPOOL_REDIS_FAIL_CLOSED  2     /* the whole limit, or 503 */

#define RATEPOOL_SHARED_ASKS_MAX    8     /* takes in Redis a request tries */
#define RATEPOOL_SHARED_TAKES_MAX   64    /* ... in all, however it waits */
#define RATEPOOL_SHARED_DENY_MS     20    /* a refusal's wait, at least */
#define RATEPOOL_RELOAD_COOL_MS     60000 /* a reload ends cooldowns with
                                             more than this left */
#define RATEPOOL_BUDGET_WAIT_MS     1000  /* near a budget: a request in
                                             flight may end by then */
#define RATEPOOL_BUSY_TRUST_MS      1000  /* Redis is asked again after */

/*
 * Full, as Redis said lately: a request is refused here without asking
 * again for a second; after that Redis is asked, as capacity may have
 * come back (a lease given back, a refund) before the time it said.
 */
#define ngx_http_ratepool_busy(sh, now_ms)                                    \
    ((sh)->lim.busy_until_ms > (now_ms)                                       \
     && (now_ms) - (sh)->lim.busy_seen_ms < RATEPOOL_BUSY_TRUST_MS)

#define RATEPOOL_QUEUE_DEFAULT      256     /* requests waiting per pool */
#define RATEPOOL_OVERLOAD_DEFAULT   2000    /* a 529's server ranks last */
#define RATEPOOL_OVERLOAD_MAX       600000

/* where a request went, for $ratepool_conversation */
#define RATEPOOL_PLACED_NONE        0       /* not a conversation */
#define RATEPOOL_PLACED_NEW         1       /* a conversation's first */
#define RATEPOOL_PLACED_HOME        2       /* where its cache is */
#define RATEPOOL_PLACED_MOVED       3       /* away from it */
#define RATEPOOL_WORKER_SLOTS       64      /* of the oldest wait */

/* what a pool's clients were answered: the status's classes */
#define RATEPOOL_ANSWER_2XX         0
#define RATEPOOL_ANSWER_429         1
#define RATEPOOL_ANSWER_4XX         2       /* other than 429 */
#define RATEPOOL_ANSWER_5XX         3
#define RATEPOOL_ANSWER_CLASSES     4

/* the last ten minutes, by ten seconds, of what the status page draws */
#define RATEPOOL_HISTORY            60
#define RATEPOOL_HISTORY_STEP       10
#define RATEPOOL_HISTORY_REQUESTS   0       /* reached a pool */
#define RATEPOOL_HISTORY_REROUTED   1       /* sent again, elsewhere */
#define RATEPOOL_HISTORY_UPSTREAM_429  2    /* the provider's 429s */
#define RATEPOOL_HISTORY_GIVEN_429  3       /* the clients' */
#define RATEPOOL_HISTORY_ERRORS     4       /* 5xx, given to clients */
#define RATEPOOL_HISTORY_KINDS      5

/* Prometheus's histograms: the bounds of their buckets, in ms */
#define RATEPOOL_HISTOGRAM_BUCKETS  10      /* and +Inf */

typedef struct {
    ngx_atomic_t                    bucket[RATEPOOL_HISTOGRAM_BUCKETS + 1];
    ngx_atomic_t                    sum_ms;
} ngx_http_ratepool_histogram_t;


typedef struct ngx_http_ratepool_ctx_s  ngx_http_ratepool_ctx_t;
typedef struct ngx_http_ratepool_store_s  ngx_http_ratepool_store_t;


/* shared memory: one entry per org, key and workspace, found by name */

typedef struct {
    ngx_queue_t                     queue;
    ngx_uint_t                      kind;
    size_t                          name_len;
    u_char                          name[RATEPOOL_ENTRY_NAME_MAX];
} ngx_http_ratepool_entry_t;


/* tokens the provider reported as used, from the answers' usage */

typedef struct {
    uint64_t                        input;
    uint64_t                        output;
    uint64_t                        cache_read;
    uint64_t                        cache_creation;
} ngx_http_ratepool_tokens_t;


typedef struct {
    uint64_t                        limit;      /* per minute, 0: unknown */
    uint64_t                        remaining;
    time_t                          reset;      /* wall clock, 0: unknown */
} ngx_http_ratepool_learned_t;


/*
 * What is counted against one set of limits, an org's class or a
 * workspace: its buckets, what its requests in flight reserved and, with
 * a Redis store, what Redis last said and what this gateway leased.
 */

typedef struct {
    ratepool_bucket_t               bucket[RATEPOOL_DIMS];
    uint64_t                        reserved_input;     /* by requests */
    uint64_t                        reserved_output;    /* in flight */
    uint64_t                        busy_until_ms;      /* full, as other
                                                           gateways used it */
    uint64_t                        busy_seen_ms;       /* Redis said so */
    ratepool_bucket_t               shared_left[RATEPOOL_DIMS];
                                            /* in Redis, as it last said */
    uint64_t                        shared_seen_ms;     /* that answer */
    uint64_t                        lease[RATEPOOL_DIMS];
                                            /* taken in Redis, not yet used */
    uint64_t                        lease_until_ms;
    uint64_t                        lease_asked_ms;     /* one at a time */
} ngx_http_ratepool_limits_sh_t;


typedef struct {
    ngx_http_ratepool_entry_t       entry;

    ngx_http_ratepool_limits_sh_t   lim;
    uint64_t                        cooldown_until_ms;  /* monotonic */
    uint64_t                        spent_until_ms;     /* out of money */
    time_t                          spent_until;        /* wall clock */
    ngx_uint_t                      backoff_level;      /* 429s without
                                                           retry-after */
    ngx_uint_t                      inflight;
    ngx_uint_t                      homes;      /* conversations whose
                                                   cache it holds */
    ngx_uint_t                      arriving;   /* first turns in flight */

    /*
     * The tokens one waiting request holds on the org it will fit on
     * first, so that smaller ones cannot take them from it bit by bit.
     */
    uint64_t                        claim_id;   /* 0: none */
    uint64_t                        claim_turns;    /* its holder's
                                                   workspace's, then */
    uint64_t                        claim_input;
    uint64_t                        claim_output;
    uint64_t                        claim_until_ms;

    ngx_http_ratepool_learned_t     requests;
    ngx_http_ratepool_learned_t     input_tokens;
    ngx_http_ratepool_learned_t     output_tokens;

    ngx_http_ratepool_tokens_t      used;
    uint64_t                        cost;       /* nano-dollars */
} ngx_http_ratepool_org_sh_t;


typedef struct {
    ngx_http_ratepool_entry_t       entry;

    u_char                          fingerprint[RATEPOOL_FINGERPRINT_LEN];
    ngx_uint_t                      dead_status;        /* 0: alive */
    time_t                          dead_since;         /* wall clock */
    uint64_t                        refused_until_ms;   /* after a 403 */
    uint64_t                        overloaded_until_ms;    /* its server
                                                       answered 529 */
    ngx_uint_t                      inflight;
    uint64_t                        last_pick_ms;

    uint64_t                        sent;
    uint64_t                        status_2xx;
    uint64_t                        status_429;
    uint64_t                        status_529;
    uint64_t                        status_401;
    uint64_t                        status_403;
    uint64_t                        status_other;
    uint64_t                        failed;             /* no response */
    uint64_t                        estimated;  /* answers that did not
                                                   say all they used */

    /* a Google access token, fetched by one worker for all */
    time_t                          token_expires;
    time_t                          token_lifetime;
    time_t                          token_next;     /* fetch no sooner */
    ngx_uint_t                      token_failures;
    size_t                          token_len;
    u_char                          token[RATEPOOL_TOKEN_MAX];

    ngx_http_ratepool_tokens_t      used;
    uint64_t                        cost;       /* nano-dollars */
} ngx_http_ratepool_key_sh_t;


typedef struct {
    ngx_http_ratepool_entry_t       entry;

    ngx_http_ratepool_limits_sh_t   lim;        /* input charged after */
    uint32_t                        input_rate;         /* learned, see
                                                   ratepool_estimate_learn() */
    uint32_t                        prompt_rate;    /* the same, of all of
                                                   a conversation's input,
                                                   as if none were cached */
    uint64_t                        output_avg;     /* produced lately, see
                                                ratepool_estimate_output() */
    uint64_t                        admitted;
    uint64_t                        rejected;
    ngx_uint_t                      waiting;
    uint64_t                        waited;
    uint64_t                        turns;      /* served from a queue */
    uint64_t                        wants_ms;   /* last found a pool full */

    ngx_http_ratepool_tokens_t      used;
    ratepool_budget_t               today;      /* all tokens, UTC day */
    ratepool_budget_t               this_month;
    uint64_t                        budget_reserved;    /* by requests in
                                                   flight, against both */
    uint64_t                        cost;       /* nano-dollars, all */
    ratepool_budget_t               cost_today;     /* nano-dollars */
    ratepool_budget_t               cost_this_month;
    uint64_t                        cost_reserved;  /* by requests in
                                                   flight, against both */
} ngx_http_ratepool_workspace_sh_t;


/* a client, by its name: what the tokens of that name asked and used */

typedef struct {
    ngx_http_ratepool_entry_t       entry;
    ngx_atomic_t                    requests;
    ngx_atomic_t                    given_429;  /* answers it got */
    ngx_http_ratepool_tokens_t      used;
    uint64_t                        cost;       /* nano-dollars */
} ngx_http_ratepool_client_sh_t;


/* a workspace's use of one priced model (ratepool_price's pattern) */

typedef struct {
    ngx_http_ratepool_entry_t       entry;
    ngx_http_ratepool_tokens_t      used;
    uint64_t                        cost;       /* nano-dollars */
} ngx_http_ratepool_spend_sh_t;


/* requests waiting for a pool, in all workers */

typedef struct {
    ngx_http_ratepool_entry_t       entry;

    ngx_uint_t                      waiting;
    uint64_t                        waited;     /* entered the queue */
    uint64_t                        served;     /* left it with a key */
    uint64_t                        timed_out;  /* left it with a 429 */
    uint64_t                        evicted;    /* gave up its place to
                                                   another workspace's */
    uint64_t                        requeued;   /* back in it: every key
                                                   refused it after it was
                                                   sent */
    uint64_t                        oldest_ms[RATEPOOL_WORKER_SLOTS];
                                                /* per worker, 0: none */

    /* what its clients were answered, and how long they took */
    ngx_atomic_t                    answers[RATEPOOL_ANSWER_CLASSES];
    ngx_http_ratepool_histogram_t   wait_time;  /* in the queue */
    ngx_http_ratepool_histogram_t   added_time; /* by the gateway */
} ngx_http_ratepool_pool_sh_t;


/* one workspace's requests waiting for one pool: when each worker's
   oldest began, so that workers serve them first come, first served */

typedef struct {
    ngx_http_ratepool_entry_t       entry;
    uint64_t                        oldest_ms[RATEPOOL_WORKER_SLOTS];
    ngx_uint_t                      waiting;    /* in all workers */
    ngx_uint_t                      owed;       /* places it is to give up
                                                   to other workspaces */
} ngx_http_ratepool_queue_sh_t;


/*
 * A conversation's home (or a shared prefix's): the org whose prompt
 * cache holds it, found by the conversation's key, until its cache
 * expires; the least recently used are given up when the zone is full.
 */

typedef struct {
    ngx_rbtree_node_t               node;       /* key: the id, or what of
                                                   it fits */
    ngx_queue_t                     lru;
    uint64_t                        id;
    ngx_http_ratepool_org_sh_t     *org;        /* its default class */
    uint64_t                        until_ms;   /* the cache's TTL */
    ratepool_turn_t                 last;       /* what its last turn
                                                   said of its prompt */
    unsigned                        prefix:1;   /* a prompt's tools and
                                                   system, warm there */
} ngx_http_ratepool_home_t;


/*
 * The last minutes, step by step, for the status page: a ring of
 * RATEPOOL_HISTORY steps, each of RATEPOOL_HISTORY_STEP seconds.
 */

typedef struct {
    ngx_atomic_t                    step;       /* time / the step's length */
    ngx_atomic_t                    count[RATEPOOL_HISTORY_KINDS];
} ngx_http_ratepool_step_t;


/* the zone's counters are atomics, counted without the lock */

typedef struct {
    ngx_uint_t                      layout;             /* of these structs */
    ngx_queue_t                     entries;
    time_t                          started;            /* wall clock */
    ngx_atomic_t                    requests;
    ngx_atomic_t                    in_flight;
    ngx_atomic_t                    rejected_auth;
    ngx_atomic_t                    rejected_workspace;
    ngx_atomic_t                    rejected_pool;
    ngx_atomic_t                    rerouted;

    /* the Redis store, as all workers see it */
    ngx_atomic_t                    redis_down;     /* the breaker is open */
    ngx_atomic_t                    redis_since;    /* of that, wall clock */
    ngx_atomic_t                    redis_connected;    /* workers */
    ngx_atomic_t                    redis_calls;
    ngx_atomic_t                    redis_fast;     /* admitted on a copy */
    ngx_atomic_t                    redis_errors;
    ngx_atomic_t                    redis_timeouts;
    ngx_atomic_t                    redis_fallbacks;
    ngx_atomic_t                    redis_noscript;
    ngx_atomic_t                    redis_latency_us;   /* moving average */
    ngx_atomic_t                    gateways;       /* alive, by heartbeat */
    ngx_atomic_t                    local_share;    /* limits divided by
                                                       this while down */
    u_char                          gateway[16];    /* this one's id */
    ngx_atomic_t                    redis_uncool;   /* a reload asks that
                                                       Redis end cooldowns
                                                       it ended here */
    ngx_atomic_t                    redis_failovers;    /* masters the
                                                       sentinels moved to */
    size_t                          redis_master_len;   /* where it is, */
    u_char                          redis_master[NGX_SOCKADDR_STRLEN];
                                                    /* under the lock */

    /* conversations' homes, under the zone's lock */
    ngx_rbtree_t                    homes;
    ngx_rbtree_node_t               homes_sentinel;
    ngx_queue_t                     homes_lru;
    ngx_uint_t                      nhomes;     /* and prefixes */
    ngx_uint_t                      conversations;
    uint64_t                        homes_evicted;  /* still live */
    uint64_t                        turns[4];   /* by RATEPOOL_PLACED_* */

    ngx_http_ratepool_step_t        history[RATEPOOL_HISTORY];
} ngx_http_ratepool_shctx_t;


typedef struct {
    ngx_slab_pool_t                *shpool;
    ngx_http_ratepool_shctx_t      *sh;
    void                           *conf;   /* ngx_http_ratepool_main_conf_t */
    const ngx_http_ratepool_store_t  *store;    /* where limits are shared */
} ngx_http_ratepool_zone_t;


/* configuration */

/*
 * The limits of one org for one model class.  An org's default class
 * (no model pattern) is what its keys point to; a request for a model
 * that matches a class pattern of the org uses that class instead.
 */

typedef struct {
    ngx_str_t                       name;       /* of the org */
    ngx_str_t                       model;      /* pattern, "": default */
    ngx_str_t                       entry;      /* "org" or "org/model" */
    ngx_uint_t                      base;       /* index of the default */
    ngx_uint_t                      rpm;
    ngx_uint_t                      itpm;
    ngx_uint_t                      otpm;
    ngx_uint_t                      tpm;        /* input and output */
    unsigned                        declared:1;
    unsigned                        cache_reads:1;  /* count toward ITPM */
    unsigned                        combined:1;     /* one limit for all
                                                       tokens, in ITPM's
                                                       bucket: OpenAI's */
    ngx_http_ratepool_org_sh_t     *sh;
    ngx_http_ratepool_zone_t       *zone;
    ngx_uint_t                      ledger;     /* index, in a worker */
} ngx_http_ratepool_org_t;


/* provider=: what a key's provider speaks and how it takes the key */

typedef struct {
    ngx_str_t                       name;
    ngx_uint_t                      dialect;
    ngx_uint_t                      credential;
    ngx_uint_t                      service;    /* RATEPOOL_SERVICE_* */
} ngx_http_ratepool_provider_t;


/* ratepool_price: a model pattern's list prices */

typedef struct {
    ngx_str_t                       pattern;
    ratepool_price_t                price;      /* nano-dollars a token */
    ngx_uint_t                      index;      /* in the main conf's */
} ngx_http_ratepool_price_t;


/* ratepool_model: what a model is called by each cloud that serves it */

typedef struct {
    ngx_str_t                       name;       /* as clients name it */
    ngx_str_t                       bedrock;    /* Bedrock's model id */
    ngx_str_t                       vertex;     /* Vertex AI's */
} ngx_http_ratepool_model_t;


/* a Google service account, and where it gets its access tokens */

typedef struct {
    ngx_str_t                       email;
    ngx_str_t                       kid;        /* its key's id */
    EVP_PKEY                       *pkey;
    ngx_str_t                       token_url;  /* the JWT's audience */
    ngx_str_t                       token_host;     /* Host */
    ngx_str_t                       token_name;     /* the host alone,
                                                   NUL-terminated: SNI and
                                                   the certificate's */
    unsigned                        token_sni:1;    /* not an address */
    ngx_str_t                       token_path;
    ngx_addr_t                     *token_addrs;
#if (NGX_HTTP_SSL)
    ngx_ssl_t                      *ssl;        /* NULL: plain http */
#endif
} ngx_http_ratepool_google_t;


typedef struct {
    ngx_str_t                       name;
    ngx_uint_t                      org;        /* index in pool->orgs */
    ngx_http_ratepool_provider_t   *provider;
    ngx_uint_t                      dialect;    /* its provider's */
    ngx_uint_t                      fallback;   /* 0: preferred */
    ngx_str_t                       server;
    ngx_str_t                       host;       /* Host header and SNI */
    ngx_addr_t                     *addrs;
    ngx_uint_t                      naddrs;
    in_port_t                       port;
    ngx_str_t                       x_api_key;      /* sent as x-api-key */
    ngx_str_t                       authorization;  /* "Bearer ..." */
    ngx_str_t                       api_key;        /* Azure's api-key */
    ngx_str_t                       region;         /* a cloud's */
    ngx_str_t                       aws_access_key;
    ngx_str_t                       aws_secret;
    ngx_str_t                       aws_token;      /* temporary ones' */
    ngx_uint_t                      credential;     /* RATEPOOL_
                                                       CREDENTIAL_* */
    ngx_str_t                       project;        /* Vertex AI's */
    ngx_http_ratepool_google_t     *google;
    u_char                          fingerprint[RATEPOOL_FINGERPRINT_LEN];
    ngx_http_ratepool_key_sh_t     *sh;
#if (NGX_HTTP_SSL)
    ngx_ssl_session_t              *ssl_session;    /* of this worker */
#endif
} ngx_http_ratepool_key_t;


/* what the wait queue calls back: admission's (ngx_http_ratepool_wait.c) */

typedef struct {
    /* NGX_OK: admitted, a key held; NGX_AGAIN: may fit in *wait_ms */
    ngx_int_t                     (*try_admit)(ngx_http_ratepool_ctx_t *ctx,
                                               uint64_t *wait_ms);
    /* when try_admit() might succeed, found without taking anything */
    uint64_t                      (*peek)(ngx_http_ratepool_ctx_t *ctx);
    /* admitted: on with the request */
    void                          (*resume)(ngx_http_request_t *r,
                                            ngx_http_ratepool_ctx_t *ctx);
    /* answers a request that cannot go, as try_admit() said */
    ngx_int_t                     (*refuse)(ngx_http_request_t *r,
                                            ngx_http_ratepool_ctx_t *ctx,
                                            ngx_int_t rc, uint64_t wait_ms);
} ngx_http_ratepool_wait_hooks_t;


/* a pool is an upstream{} block with the "ratepool" directive */

typedef struct {
    ngx_str_t                       zone_name;
    ngx_http_ratepool_zone_t       *zone;
    ngx_array_t                    *orgs;       /* ngx_http_ratepool_org_t,
                                                   every org and class */
    ngx_uint_t                      classes;    /* patterns among them */
    ngx_array_t                    *keys;       /* ngx_http_ratepool_key_t */
    ngx_http_upstream_srv_conf_t   *upstream;
    ngx_uint_t                      queue_max;
    ngx_msec_t                      overload;   /* a 529's server ranks
                                                   after the others */
    ngx_http_ratepool_pool_sh_t    *sh;

    /* this worker's requests waiting for the pool, a queue a workspace */
    ngx_queue_t                    *waiting;
    ngx_http_ratepool_queue_sh_t  **queues;     /* the same, in all */
    ngx_uint_t                      nwaiting;
    ngx_uint_t                      next_workspace;     /* round-robin */
    ngx_event_t                     wake;
    const ngx_http_ratepool_wait_hooks_t  *hooks;
} ngx_http_ratepool_pool_t;


typedef struct {
    ngx_str_t                          name;
    ngx_uint_t                         rpm;
    ngx_uint_t                         itpm;
    ngx_uint_t                         otpm;
    ngx_uint_t                         daily_tokens;     /* 0: none */
    ngx_uint_t                         monthly_tokens;
    uint64_t                           daily_cost;  /* nano-dollars, */
    uint64_t                           monthly_cost;    /* 0: none */
    ngx_uint_t                         weight;      /* of its turns */
    ngx_http_ratepool_workspace_sh_t  *sh;
    ngx_http_ratepool_spend_sh_t     **spend;   /* by price, in order */
} ngx_http_ratepool_workspace_t;


typedef struct {
    u_char                          digest[32];  /* sha256 of the token */
    ngx_uint_t                      workspace;   /* index */
    ngx_str_t                       workspace_name;
    ngx_str_t                       name;       /* name=, or its hash's
                                                   first digits */
    ngx_http_ratepool_client_sh_t  *sh;         /* shared by its name */
} ngx_http_ratepool_client_t;


/* the Redis store: ratepool_zone ... redis= */

typedef struct ngx_http_ratepool_redis_cmd_s  ngx_http_ratepool_redis_cmd_t;
typedef struct ngx_http_ratepool_redis_s  ngx_http_ratepool_redis_t;

/* reply is a redisReply, NULL if the command failed */
typedef void (*ngx_http_ratepool_redis_pt)(ngx_http_ratepool_redis_cmd_t *cmd,
    void *reply);

#define RATEPOOL_REDIS_TAIL_MAX     768

struct ngx_http_ratepool_redis_cmd_s {
    ngx_queue_t                     queue;
    ngx_http_ratepool_redis_pt      handler;
    void                           *data;       /* NULL: nobody waits */
    uint64_t                        sent;       /* microseconds */
    ngx_uint_t                      nargs;      /* after the script */
    size_t                          op;         /* offset of the op letter */
    size_t                          tail_len;
    u_char                          tail[RATEPOOL_REDIS_TAIL_MAX];
    unsigned                        script:1;
    unsigned                        resent:1;   /* as EVAL, once */
};

typedef struct {
    ngx_str_t                       server;     /* as configured */
    ngx_addr_t                     *addrs;      /* redis=, or a cluster's
                                                   nodes */
    ngx_uint_t                      naddrs;
    unsigned                        cluster:1;  /* redis_cluster= */
    ngx_addr_t                     *cluster_nodes;
    ngx_uint_t                      ncluster;
    ngx_str_t                       host;       /* of redis= */
    ngx_addr_t                     *sentinels;  /* redis_sentinel=, or */
    ngx_uint_t                      nsentinels; /* none */
    ngx_str_t                       master;     /* redis_master= */
    ngx_str_t                       tls_name;   /* its certificate's */
#if (NGX_HTTP_SSL)
    ngx_ssl_t                      *ssl;        /* NULL: plain TCP */
#endif
    unsigned                        tls:1;
    unsigned                        tls_sni:1;  /* a name, not an address */
    ngx_str_t                       user;
    ngx_str_t                       password;
    ngx_uint_t                      db;
    ngx_msec_t                      timeout;    /* per request */
    ngx_uint_t                      fail;       /* RATEPOOL_REDIS_FAIL_* */
    ngx_flag_t                      lease;      /* the fast path */
    ngx_str_t                       prefix;     /* "ratepool:{zone}:" */
    u_char                          sha[40];    /* of ratepool_script */
    ngx_http_ratepool_redis_t      *conn;       /* this worker's */
    void                           *ledger;     /* this worker's, of
                                                   charges not yet sent */
} ngx_http_ratepool_redis_conf_t;


typedef struct {
    ngx_shm_zone_t                 *shm_zone;
    ngx_http_ratepool_redis_conf_t *redis;      /* NULL: shared memory */
    ngx_array_t                     pools;       /* ..._pool_t * */
    ngx_array_t                     workspaces;  /* ..._workspace_t */
    ngx_array_t                     clients;     /* ..._client_t */
    ngx_array_t                     passes;      /* ..._loc_conf_t * */
    ngx_array_t                     models;      /* ..._model_t */
    ngx_array_t                     prices;      /* ..._price_t */
    ngx_array_t                     bedrock_betas;  /* ngx_str_t: flags
                                                   InvokeModel takes */
    ngx_event_t                     tokens;     /* this worker's look at
                                                   Google tokens */
    ngx_uint_t                      google_keys;
    ngx_int_t                       request_id_index;
    const EVP_MD                   *sha256;     /* looked up once */
    EVP_MD_CTX                     *sha256_ctx; /* reused by each worker */
    uint64_t                        claims;     /* made by this worker */
} ngx_http_ratepool_main_conf_t;


typedef struct {
    ngx_http_upstream_srv_conf_t   *upstream;    /* from ratepool_pass */
    ngx_http_ratepool_pool_t       *pool;
    ngx_int_t                       output_reserve;     /* tokens */
    ngx_msec_t                      wait;
    ngx_str_t                       url;
    ngx_uint_t                      line;
    ngx_str_t                       file;
} ngx_http_ratepool_loc_conf_t;


/*
 * The store of limits shared with other gateways, chosen when the
 * configuration is read (ngx_http_ratepool_store.h): the zone alone, or
 * Redis.  A take that the store answers later calls handler(data, ...).
 */

typedef void (*ngx_http_ratepool_taken_pt)(void *data, ngx_int_t rc,
    uint64_t wait_ms, ngx_uint_t mask);

struct ngx_http_ratepool_store_s {
    ngx_int_t                     (*take)(ngx_http_ratepool_ctx_t *ctx,
                                          ngx_http_ratepool_taken_pt handler,
                                          void *data);
    void                          (*move)(ngx_http_ratepool_ctx_t *ctx);
    void                          (*usage)(ngx_http_ratepool_ctx_t *ctx,
                                           uint64_t input, uint64_t output,
                                           uint64_t total, uint64_t cost);
    void                          (*end)(ngx_http_ratepool_ctx_t *ctx);
    /* back to waiting: its tries' requests stay charged to their orgs */
    void                          (*requeue)(ngx_http_ratepool_ctx_t *ctx);
    void                          (*cool)(ngx_http_ratepool_ctx_t *ctx,
                                          ngx_http_ratepool_org_t *org,
                                          uint64_t cooldown_ms);
    void                          (*learn)(ngx_http_ratepool_ctx_t *ctx,
                                           ngx_http_ratepool_org_t *org,
                                           uint64_t *seen, uint64_t *limits,
                                           int64_t *remaining);
    /* where the fleet keeps the conversation's cache: into the zone */
    ngx_int_t                     (*home)(ngx_http_ratepool_ctx_t *ctx,
                                          ngx_http_ratepool_taken_pt handler,
                                          void *data);
    void                          (*homed)(ngx_http_ratepool_ctx_t *ctx,
                                           ngx_http_ratepool_org_t *org,
                                           uint64_t ttl_ms,
                                           ratepool_turn_t *turn);
    ngx_int_t                     (*init_process)(ngx_cycle_t *cycle,
                                       ngx_http_ratepool_main_conf_t *rmcf);
    void                          (*exit_process)(
                                       ngx_http_ratepool_main_conf_t *rmcf);
};


/* what the Redis store charged for a request */

typedef struct {
    ngx_http_ratepool_redis_cmd_t  *cmd;        /* a take, until its reply */
    ngx_http_ratepool_redis_cmd_t  *home_cmd;   /* a home asked for */
    ngx_event_t                     timer;
    ngx_http_ratepool_org_t        *org;        /* charged there */
    uint64_t                        input;
    uint64_t                        output;
    uint64_t                        block[RATEPOOL_LEASE_BLOCKS];
                                                /* a take's lease:
                                                   workspace's, org's */
    ngx_uint_t                      asks;       /* since it last waited */
    ngx_uint_t                      takes;      /* all told */
    ngx_http_ratepool_taken_pt      handler;    /* told of the take's */
    void                           *data;       /* answer */
    unsigned                        taken:1;    /* Redis took it */
    unsigned                        late:1;     /* went on without the
                                                   take's reply */
    unsigned                        alone:1;    /* decided here, as
                                                   redis_fail= says */
    unsigned                        kept:1;     /* the org refused it with
                                                   a 429: keeps its tokens */
} ngx_http_ratepool_shared_req_t;


/* per request */

struct ngx_http_ratepool_ctx_s {
    ngx_http_request_t             *request;
    ngx_http_ratepool_pool_t       *pool;
    ngx_http_ratepool_workspace_t  *workspace;
    ngx_http_ratepool_client_t     *client;
    ngx_uint_t                      dialect;    /* the client's API */
    ngx_http_ratepool_key_t        *key;        /* of the current try */
    ngx_http_ratepool_key_t        *held;       /* counted in flight */
    ngx_http_ratepool_key_t        *next;       /* held for the next try */
    uint64_t                        tried;      /* bitmap of key indexes */
    ngx_uint_t                      tries;      /* sends, all told */
    ngx_uint_t                      round_tries;    /* since admitted */
    ngx_uint_t                      requeued;   /* times back in the queue */
    uint64_t                        soonest_ms; /* when exhausted */

    ngx_str_t                       model;      /* from the body */
    ngx_http_ratepool_model_t      *cloud_model;    /* its clouds' names */
    off_t                           model_at;   /* its value, in the body */
    off_t                           model_end;
    off_t                           body_length;    /* as the client sent
                                                   it, -1: not yet kept */
    ngx_buf_t                      *body_copy;  /* whole, in memory, for a
                                                   body rewritten a try */
    ngx_str_t                       signed_auth;    /* SigV4, this try's */
    ngx_str_t                       cloud_message;  /* a cloud's error */
    void                           *eventstream;    /* Bedrock's, read */
    u_char                          amz_date[RATEPOOL_AMZ_DATE_LEN + 1];

    /* the conversation the request belongs to, and its cache's home */
    uint64_t                        conversation;   /* key, 0: none */
    uint64_t                        prefix;     /* of its tools and system */
    ngx_http_ratepool_org_sh_t     *home;       /* NULL: new, or none */
    ngx_http_ratepool_org_sh_t     *arriving;   /* a first turn's org */
    ngx_http_ratepool_org_sh_t     *claimed;    /* where it waits for room */
    uint64_t                        claim_id;   /* its mark there, 0: none */
    uint64_t                        prefix_bytes;
    uint64_t                        input_full;     /* written anew */
    uint64_t                        input_prefix;   /* of its prefix */

    /* the input reserved on the org of the key held, and of the next */
    uint64_t                        held_input;
    uint64_t                        next_input;
    uint64_t                        acquired_input;
    ngx_uint_t                      placement;  /* RATEPOOL_PLACED_* */
    ngx_uint_t                     *classes;    /* org index to the class
                                                   this model uses there */
    uint64_t                        body_bytes;
    off_t                           body_object_at; /* its "{", -1: none */
    off_t                           usage_edit_at;  /* where to ask for
                                                       usage, -1: nowhere */
    size_t                          usage_edit_skip;    /* bytes replaced */
    ngx_str_t                       usage_edit;     /* by these */
    uint64_t                        input_cost;     /* estimated */
    uint64_t                        output_cost;    /* reserved */
    uint64_t                        budget_cost;    /* reserved against
                                                   the workspace's budgets */
    uint64_t                        money_cost;     /* the same, in
                                                   nano-dollars */
    ngx_http_ratepool_price_t      *price;      /* of its model, or NULL */
    unsigned                        price_found:1;
    uint64_t                        output_cap;     /* max_tokens, or
                                                   ratepool_output_reserve */
    ngx_int_t                       phase_rc;   /* once the body is read */
    ngx_uint_t                      moved_status;   /* of a try moved on
                                                   as if it were a 429 */
    unsigned                        stream:1;   /* the body asks for SSE */
    unsigned                        cache_long:1;   /* "ttl":"1h" */
    unsigned                        redirected:1;   /* to another pool */
    unsigned                        usage_asked:1;  /* by the client */
    unsigned                        usage_declined:1;   /* could not be */
    unsigned                        body_whole:1;
    unsigned                        usage_added:1;  /* include_usage, by
                                                       the gateway */
    unsigned                        count_only:1;   /* count_tokens: free,
                                                       limited apart */
    unsigned                        answer_whole:1; /* its last byte came */

    /* the event being held, while usage chunks are kept from clients */
    ngx_buf_t                      *event;
    ngx_chain_t                    *free;
    ngx_chain_t                    *busy;
    unsigned                        event_nl:2;     /* newlines in a row */
    unsigned                        event_whole:1;  /* too big: passed */

    /* why the request could not go now, and when it might */
    const char                     *limited_what;
    ngx_uint_t                      limited_limit;
    uint64_t                        budget_limit;   /* in tokens, or */
    unsigned                        limited_money:1;    /* nano-dollars */

    ngx_queue_t                     queue;      /* while waiting */
    ngx_event_t                     wait_timer;
    uint64_t                        arrived_ms;
    uint64_t                        body_read_ms;   /* 0: not yet */
    uint64_t                        wait_start_ms;
    uint64_t                        wait_until_ms;
    uint64_t                        waited_ms;

    ngx_http_ratepool_shared_req_t  shared;     /* the Redis store's */

    ngx_int_t                     (*process_header)(ngx_http_request_t *r);
    ngx_int_t                     (*reinit_request)(ngx_http_request_t *r);

    unsigned                        answered:1;     /* this try has a status */
    unsigned                        retry_same:1;   /* a stale keepalive
                                                       connection failed */
    unsigned                        exhausted:1;    /* last answer is a 429
                                                       that no key can beat */
    unsigned                        refused:1;      /* last answer is a 401
                                                       that no key can beat */
    unsigned                        spent:1;        /* last answer says the
                                                       org's money is spent */
    unsigned                        overloaded:1;   /* last answer is a 529
                                                       or 503 */
    unsigned                        too_large:1;    /* a 429 for the request
                                                       alone: larger than
                                                       its org's limit */
    unsigned                        own_error_sent:1;
    unsigned                        ws_reserved:1;  /* tokens, until the
                                                       request ends */
    unsigned                        waiting:1;
    unsigned                        limited_pool:1; /* not the workspace */
    unsigned                        limited_budget:1;   /* its day's or
                                                   month's, by requests in
                                                   flight */

    ngx_buf_t                      *own_error;  /* the gateway's answer in
                                                   place of the body */
    ratepool_usage_scanner_t       *usage;      /* reads the answer */
    unsigned                        usage_counted:1;
    unsigned                        usage_unread:1; /* an answer whose
                                                       usage cannot be read */
};


extern ngx_module_t  ngx_http_ratepool_module;


/* a workspace with a budget for the day or month, in tokens or money */
#define ngx_http_ratepool_has_budget(ws)                                      \
    ((ws)->daily_tokens || (ws)->monthly_tokens || (ws)->daily_cost          \
     || (ws)->monthly_cost)

/* a key's org, in its default class */
#define ngx_http_ratepool_key_org(pool, key)                                  \
    (&((ngx_http_ratepool_org_t *) (pool)->orgs->elts)[(key)->org])

/* a key's org, in the class of the request's model */
#define ngx_http_ratepool_ctx_org(ctx, key)                                   \
    (&((ngx_http_ratepool_org_t *) (ctx)->pool->orgs->elts)                   \
        [(ctx)->classes ? (ctx)->classes[(key)->org] : (key)->org])


/* ngx_current_msec is monotonic and shared by all workers of a host */
#define ngx_http_ratepool_now_ms()  ((uint64_t) ngx_current_msec)


/* this gateway's share of a limit while the Redis store is down */

static ngx_inline uint64_t
ngx_http_ratepool_share(ngx_http_ratepool_zone_t *zone, uint64_t limit)
{
    ngx_atomic_uint_t  n;

    n = zone->sh->local_share;

    return (n > 1 && limit) ? ngx_max(limit / n, 1) : limit;
}


/*
 * Where the first byte that cannot go into a header value is (a control
 * character, a space, anything beyond ASCII): len if there is none.
 */

static ngx_inline size_t
ngx_http_ratepool_header_bad(u_char *p, size_t len)
{
    size_t  i;

    for (i = 0; i < len && p[i] > ' ' && p[i] < 0x7f; i++) {
        /* void */
    }

    return i;
}


/* an empty ngx_str_t may have no data, which strncmp must not be given */

static ngx_inline ngx_uint_t
ngx_http_ratepool_str_eq(ngx_str_t *a, ngx_str_t *b)
{
    return a->len == b->len
           && (a->len == 0 || ngx_strncmp(a->data, b->data, a->len) == 0);
}


#endif /* _NGX_HTTP_RATEPOOL_H_INCLUDED_ */

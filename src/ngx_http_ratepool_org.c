
/*
 * Copyright (C) ratepool authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool.h"
#include "ngx_http_ratepool_org.h"


/*
 * An org's limits for one model class as the gateway applies them: what
 * the provider said wins over what was configured, a combined org (one
 * limit for all tokens) keeps it in the input bucket's place, and while
 * a shared store is down this gateway has its share.
 */


/* an org's buckets of requests, input and output tokens, and their limits */

void
ngx_http_ratepool_org_buckets(ngx_http_ratepool_org_t *org,
    ratepool_bucket_t **bucket, uint64_t *limit)
{
    ngx_http_ratepool_org_sh_t  *osh;

    osh = org->sh;

    /*
     * What the provider says wins over what was configured; while a
     * shared store is down, this gateway has its share of it.
     */

    bucket[0] = &osh->rpm_bucket;
    limit[0] = osh->requests.limit ? osh->requests.limit : org->rpm;

    bucket[1] = &osh->itpm_bucket;
    limit[1] = osh->input_tokens.limit ? osh->input_tokens.limit : org->itpm;

    bucket[2] = &osh->otpm_bucket;
    limit[2] = osh->output_tokens.limit ? osh->output_tokens.limit
                                        : org->otpm;

    if (org->combined) {
        limit[1] = osh->input_tokens.limit ? osh->input_tokens.limit
                                           : org->tpm;
        limit[2] = 0;
    }

    limit[0] = ngx_http_ratepool_share(org->zone, limit[0]);
    limit[1] = ngx_http_ratepool_share(org->zone, limit[1]);
    limit[2] = ngx_http_ratepool_share(org->zone, limit[2]);
}


/*
 * What input and output tokens weigh in the org's token buckets: where
 * one limit counts both, they all go to the first.
 */

void
ngx_http_ratepool_org_split(ngx_http_ratepool_org_t *org, uint64_t input,
    uint64_t output, uint64_t *tokens)
{
    if (org->combined) {
        tokens[1] = input + output;
        tokens[2] = 0;

    } else {
        tokens[1] = input;
        tokens[2] = output;
    }
}



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
    ngx_uint_t                   d;
    ngx_http_ratepool_org_sh_t  *osh;

    osh = org->sh;

    /*
     * What the provider says wins over what was configured; while a
     * shared store is down, this gateway has its share of it.
     */

    limit[RATEPOOL_RPM] = osh->requests.limit ? osh->requests.limit
                                              : org->rpm;

    if (org->combined) {
        limit[RATEPOOL_ITPM] = osh->input_tokens.limit
                               ? osh->input_tokens.limit : org->tpm;
        limit[RATEPOOL_OTPM] = 0;

    } else {
        limit[RATEPOOL_ITPM] = osh->input_tokens.limit
                               ? osh->input_tokens.limit : org->itpm;
        limit[RATEPOOL_OTPM] = osh->output_tokens.limit
                               ? osh->output_tokens.limit : org->otpm;
    }

    for (d = 0; d < RATEPOOL_DIMS; d++) {
        bucket[d] = &osh->lim.bucket[d];
        limit[d] = ngx_http_ratepool_share(org->zone, limit[d]);
    }
}


/*
 * What input and output tokens weigh in the org's token buckets: where
 * one limit counts both, they all go to the first.  The request's own
 * weight (RATEPOOL_RPM) is the caller's.
 */

void
ngx_http_ratepool_org_split(ngx_http_ratepool_org_t *org, uint64_t input,
    uint64_t output, uint64_t *tokens)
{
    if (org->combined) {
        tokens[RATEPOOL_ITPM] = input + output;
        tokens[RATEPOOL_OTPM] = 0;

    } else {
        tokens[RATEPOOL_ITPM] = input;
        tokens[RATEPOOL_OTPM] = output;
    }
}



/*
 * Copyright (C) ratepool authors
 */


#ifndef _NGX_HTTP_RATEPOOL_ORG_H_INCLUDED_
#define _NGX_HTTP_RATEPOOL_ORG_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool.h"


/* an org's buckets of requests, input and output tokens, and limits */
void ngx_http_ratepool_org_buckets(ngx_http_ratepool_org_t *org,
    ratepool_bucket_t **bucket, uint64_t *limit);

/* what input and output tokens weigh in those buckets */
void ngx_http_ratepool_org_split(ngx_http_ratepool_org_t *org,
    uint64_t input, uint64_t output, uint64_t *tokens);


#endif /* _NGX_HTTP_RATEPOOL_ORG_H_INCLUDED_ */

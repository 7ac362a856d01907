
/*
 * Copyright (C) ratepool authors
 */


#ifndef _RATEPOOL_BUCKET_H_INCLUDED_
#define _RATEPOOL_BUCKET_H_INCLUDED_


#include <stdint.h>


/*
 * A continuously refilling token bucket, the way the providers describe
 * theirs: capacity is the per-minute limit, and the bucket refills at
 * limit / 60000 units per millisecond.  Levels are kept in milli-units
 * (1000 corresponds to one request or one token) so that slow refill
 * rates do not round away.  The limit is passed in on every call because
 * it may be configured or learned from the provider, and may change.
 * A limit of 0 means "unknown": such a bucket never refuses.
 */

#define RATEPOOL_MILLI          1000

/*
 * Limits and costs beyond this are clamped: ten billion per minute is far
 * above any provider's, and keeps every product below 2^63.
 */
#define RATEPOOL_BUCKET_MAX     10000000000ULL

#define RATEPOOL_BUCKET_OK      0
#define RATEPOOL_BUCKET_WAIT    1
#define RATEPOOL_BUCKET_NEVER   2


typedef struct {
    int64_t    level;           /* milli-units available, may be negative */
    uint64_t   last_ms;         /* monotonic time of the last refill */
} ratepool_bucket_t;


void ratepool_bucket_init(ratepool_bucket_t *b, uint64_t limit,
    uint64_t now_ms);
void ratepool_bucket_refill(ratepool_bucket_t *b, uint64_t limit,
    uint64_t now_ms);
int ratepool_bucket_take(ratepool_bucket_t *b, uint64_t limit,
    uint64_t units, uint64_t now_ms, uint64_t *wait_ms);
uint64_t ratepool_bucket_wait_ms(ratepool_bucket_t *b, uint64_t limit,
    uint64_t units, uint64_t now_ms);
void ratepool_bucket_put(ratepool_bucket_t *b, uint64_t limit,
    uint64_t units);
void ratepool_bucket_debit(ratepool_bucket_t *b, uint64_t limit,
    uint64_t units, uint64_t now_ms);
void ratepool_bucket_clamp(ratepool_bucket_t *b, uint64_t limit,
    uint64_t remaining_units, uint64_t now_ms);
uint64_t ratepool_bucket_level(ratepool_bucket_t *b, uint64_t limit,
    uint64_t now_ms);
uint64_t ratepool_bucket_fit_ms(ratepool_bucket_t *b, uint64_t limit,
    uint64_t units, uint64_t reserved, uint64_t now_ms);
uint64_t ratepool_bucket_free(ratepool_bucket_t *b, uint64_t limit,
    uint64_t reserved, uint64_t now_ms);


#endif /* _RATEPOOL_BUCKET_H_INCLUDED_ */

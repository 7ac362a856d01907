
/*
 * Copyright (C) ratepool authors
 */


#include "ratepool_bucket.h"


/* a full bucket refills in one minute; longer idle time adds nothing */
#define RATEPOOL_BUCKET_PERIOD_MS  60000


static uint64_t
ratepool_clamp(uint64_t n)
{
    return n < RATEPOOL_BUCKET_MAX ? n : RATEPOOL_BUCKET_MAX;
}


void
ratepool_bucket_init(ratepool_bucket_t *b, uint64_t limit, uint64_t now_ms)
{
    limit = ratepool_clamp(limit);

    b->level = (int64_t) (limit * RATEPOOL_MILLI);
    b->last_ms = now_ms;
}


void
ratepool_bucket_refill(ratepool_bucket_t *b, uint64_t limit, uint64_t now_ms)
{
    int64_t   capacity, added;
    uint64_t  elapsed_ms;

    limit = ratepool_clamp(limit);

    if (now_ms <= b->last_ms) {
        return;
    }

    elapsed_ms = now_ms - b->last_ms;
    b->last_ms = now_ms;

    capacity = (int64_t) (limit * RATEPOOL_MILLI);

    if (b->level >= capacity) {
        /* a lowered limit shrinks the bucket at once */
        b->level = capacity;
        return;
    }

    /*
     * Debt (a negative level) may take longer than one period to repay,
     * so the elapsed time is capped only by what fills a bucket from
     * its lowest possible point; the product stays far below 2^63.
     */

    if (elapsed_ms > 100 * RATEPOOL_BUCKET_PERIOD_MS) {
        elapsed_ms = 100 * RATEPOOL_BUCKET_PERIOD_MS;
    }

    /* milli-units: limit * 1000 per 60000 ms */
    added = (int64_t) (elapsed_ms * limit / (RATEPOOL_BUCKET_PERIOD_MS
                                             / RATEPOOL_MILLI));

    b->level += added;

    if (b->level > capacity) {
        b->level = capacity;
    }
}


uint64_t
ratepool_bucket_wait_ms(ratepool_bucket_t *b, uint64_t limit, uint64_t units,
    uint64_t now_ms)
{
    int64_t  need;

    limit = ratepool_clamp(limit);
    units = ratepool_clamp(units);

    if (limit == 0) {
        return 0;
    }

    ratepool_bucket_refill(b, limit, now_ms);

    need = (int64_t) (units * RATEPOOL_MILLI) - b->level;

    if (need <= 0) {
        return 0;
    }

    /* round up: the units are there only once the whole need has refilled */
    return ((uint64_t) need * (RATEPOOL_BUCKET_PERIOD_MS / RATEPOOL_MILLI)
            + limit - 1) / limit;
}


int
ratepool_bucket_take(ratepool_bucket_t *b, uint64_t limit, uint64_t units,
    uint64_t now_ms, uint64_t *wait_ms)
{
    uint64_t  wait;

    limit = ratepool_clamp(limit);
    units = ratepool_clamp(units);

    *wait_ms = 0;

    if (limit == 0) {
        return RATEPOOL_BUCKET_OK;
    }

    if (units > limit) {
        return RATEPOOL_BUCKET_NEVER;
    }

    wait = ratepool_bucket_wait_ms(b, limit, units, now_ms);

    if (wait > 0) {
        *wait_ms = wait;
        return RATEPOOL_BUCKET_WAIT;
    }

    b->level -= (int64_t) (units * RATEPOOL_MILLI);

    return RATEPOOL_BUCKET_OK;
}


void
ratepool_bucket_put(ratepool_bucket_t *b, uint64_t limit, uint64_t units)
{
    int64_t  capacity;

    limit = ratepool_clamp(limit);
    units = ratepool_clamp(units);

    capacity = (int64_t) (limit * RATEPOOL_MILLI);

    b->level += (int64_t) (units * RATEPOOL_MILLI);

    if (b->level > capacity) {
        b->level = capacity;
    }
}


/*
 * Charges what was used after the fact: the level may go below zero, and
 * the debt is repaid by the refill before anything fits again.  Debt is
 * capped at what a hundred minutes repay, as the refill is.
 */

void
ratepool_bucket_debit(ratepool_bucket_t *b, uint64_t limit, uint64_t units,
    uint64_t now_ms)
{
    int64_t  floor;

    limit = ratepool_clamp(limit);
    units = ratepool_clamp(units);

    if (limit == 0) {
        return;
    }

    ratepool_bucket_refill(b, limit, now_ms);

    b->level -= (int64_t) (units * RATEPOOL_MILLI);

    /* one answer never owes more than a minute: the provider's own
       bound on what it makes a client wait */
    floor = -(int64_t) (limit * RATEPOOL_MILLI);

    if (b->level < floor) {
        b->level = floor;
    }
}


/*
 * The provider told us how much is left; it knows better than we do
 * when it has less, so the level only ever moves down to meet it.
 */

void
ratepool_bucket_clamp(ratepool_bucket_t *b, uint64_t limit,
    uint64_t remaining_units, uint64_t now_ms)
{
    int64_t  remaining;

    limit = ratepool_clamp(limit);
    remaining_units = ratepool_clamp(remaining_units);

    ratepool_bucket_refill(b, limit, now_ms);

    remaining = (int64_t) (remaining_units * RATEPOOL_MILLI);

    if (remaining < b->level) {
        b->level = remaining;
    }
}


uint64_t
ratepool_bucket_level(ratepool_bucket_t *b, uint64_t limit, uint64_t now_ms)
{
    limit = ratepool_clamp(limit);

    ratepool_bucket_refill(b, limit, now_ms);

    return b->level > 0 ? (uint64_t) b->level / RATEPOOL_MILLI : 0;
}


/*
 * How long until "units" fit beside the units that requests in flight
 * have reserved.  A cost above the limit is served alone, from a full
 * bucket.  If only the requests in flight stand in the way, when they end
 * is unknown: a second is the answer.
 */

uint64_t
ratepool_bucket_fit_ms(ratepool_bucket_t *b, uint64_t limit, uint64_t units,
    uint64_t reserved, uint64_t now_ms)
{
    uint64_t  wait;

    limit = ratepool_clamp(limit);
    units = ratepool_clamp(units);
    reserved = ratepool_clamp(reserved);

    if (limit == 0) {
        return 0;
    }

    if (units > limit) {
        units = limit;
    }

    if (units + reserved <= limit) {
        return ratepool_bucket_wait_ms(b, limit, units + reserved, now_ms);
    }

    wait = ratepool_bucket_wait_ms(b, limit, limit, now_ms);

    return wait ? wait : RATEPOOL_BUCKET_PERIOD_MS / 60;
}


/* what is left for new requests: the level less what is reserved */

uint64_t
ratepool_bucket_free(ratepool_bucket_t *b, uint64_t limit, uint64_t reserved,
    uint64_t now_ms)
{
    uint64_t  level;

    level = ratepool_bucket_level(b, limit, now_ms);

    return level > reserved ? level - reserved : 0;
}

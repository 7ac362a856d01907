
/*
 * Copyright (C) ratepool authors
 */


#include "ratepool_limits.h"


void
ratepool_lease_blocks(const uint64_t *limits, const uint64_t *cost,
    uint64_t gateways, uint64_t *block)
{
    uint64_t  n;
    unsigned  h, d, none;

    n = 4 * ((gateways ? gateways : 1) + 1);

    for (h = 0; h < RATEPOOL_LEASE_BLOCKS; h += RATEPOOL_DIMS) {
        none = 0;

        for (d = h; d < h + RATEPOOL_DIMS; d++) {
            block[d] = limits[d] / n;

            /* a block that would not hold this request is no use */
            if (block[d] < cost[d]) {
                block[d] = 0;
            }

            if (limits[d] && block[d] == 0) {
                none = 1;
            }
        }

        if (none) {
            for (d = h; d < h + RATEPOOL_DIMS; d++) {
                block[d] = 0;
            }
        }
    }
}


int
ratepool_lease_holds(const uint64_t *limits, const uint64_t *lease,
    const uint64_t *cost)
{
    int       limited;
    unsigned  d;

    limited = 0;

    for (d = 0; d < RATEPOOL_DIMS; d++) {
        if (limits[d] == 0) {
            continue;
        }

        if (lease[d] < cost[d]) {
            return -1;
        }

        limited = 1;
    }

    return limited;
}


void
ratepool_lease_take(const uint64_t *limits, uint64_t *lease,
    const uint64_t *cost)
{
    unsigned  d;

    for (d = 0; d < RATEPOOL_DIMS; d++) {
        if (limits[d]) {
            lease[d] -= (cost[d] < lease[d]) ? cost[d] : lease[d];
        }
    }
}


int
ratepool_dims_zero(const uint64_t *v)
{
    unsigned  d;

    for (d = 0; d < RATEPOOL_DIMS; d++) {
        if (v[d]) {
            return 0;
        }
    }

    return 1;
}


uint64_t
ratepool_tighter(int is_reset, int seen, uint64_t kept, uint64_t value)
{
    if (!seen) {
        return value;
    }

    if (is_reset) {
        return value > kept ? value : kept;
    }

    return value < kept ? value : kept;
}

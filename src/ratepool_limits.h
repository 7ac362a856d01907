
/*
 * Copyright (C) ratepool authors
 */


#ifndef _RATEPOOL_LIMITS_H_INCLUDED_
#define _RATEPOOL_LIMITS_H_INCLUDED_


#include <stdint.h>


/*
 * What a provider limits per minute, and a workspace too: arrays of
 * limits, costs, buckets and leases are indexed by these.  An org with
 * one limit for all tokens (OpenAI's) keeps it in RATEPOOL_ITPM's place
 * and has no RATEPOOL_OTPM limit.
 */

enum {
    RATEPOOL_RPM = 0,               /* requests */
    RATEPOOL_ITPM,                  /* input tokens */
    RATEPOOL_OTPM,                  /* output tokens */
    RATEPOOL_DIMS
};

/* a lease's blocks: the workspace's dimensions, then the org's */
#define RATEPOOL_LEASE_BLOCKS       (2 * RATEPOOL_DIMS)


/*
 * The blocks of capacity a gateway asks Redis to lease it along with a
 * request, from the workspace's and the org's limits (0: none) and the
 * request's cost there: so small that the live gateways, and one more,
 * together lease at most a quarter of a bucket.  A holder's blocks are
 * all 0 when one of its limited dimensions would get none that holds
 * the request: such a lease would never be used.
 */
void ratepool_lease_blocks(const uint64_t *limits, const uint64_t *cost,
    uint64_t gateways, uint64_t *block);

/*
 * Whether a lease holds a request's cost in every limited dimension:
 * 1 it does, 0 nothing is limited, -1 it does not.
 */
int ratepool_lease_holds(const uint64_t *limits, const uint64_t *lease,
    const uint64_t *cost);

/* the cost taken from a lease that holds it, in the limited dimensions */
void ratepool_lease_take(const uint64_t *limits, uint64_t *lease,
    const uint64_t *cost);

/* whether every dimension of a lease, a limit or a cost is 0 */
int ratepool_dims_zero(const uint64_t *v);


/*
 * Two reports of one limit in one answer (an OpenAI org's and its
 * project's token limits): the tighter wins, the smaller limit or
 * remaining, the later reset.  Returns the value to keep.
 */
uint64_t ratepool_tighter(int is_reset, int seen, uint64_t kept,
    uint64_t value);


#endif /* _RATEPOOL_LIMITS_H_INCLUDED_ */

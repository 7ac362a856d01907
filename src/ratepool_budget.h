
/*
 * Copyright (C) ratepool authors
 */


#ifndef _RATEPOOL_BUDGET_H_INCLUDED_
#define _RATEPOOL_BUDGET_H_INCLUDED_


#include <stdint.h>
#include <time.h>


/*
 * A token budget per calendar day or month, in UTC, as providers reset
 * their spend caps: what was used counts until the period changes, then
 * starts again from zero.  The period is an index (days, or months since
 * year 0) so that comparing two of them is all a reset needs.
 */

#define RATEPOOL_BUDGET_DAY    0
#define RATEPOOL_BUDGET_MONTH  1


typedef struct {
    uint64_t   used;            /* tokens in the period */
    int64_t    period;          /* index of the period "used" is for */
} ratepool_budget_t;


int64_t ratepool_budget_period(int kind, time_t now);
time_t ratepool_budget_reset(int kind, time_t now);
uint64_t ratepool_budget_used(ratepool_budget_t *b, int kind, time_t now);
void ratepool_budget_add(ratepool_budget_t *b, int kind, time_t now,
    uint64_t tokens);


#endif /* _RATEPOOL_BUDGET_H_INCLUDED_ */

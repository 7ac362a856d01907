
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


/*
 * Money: a model's list prices in nano-dollars per token (dollars per
 * million tokens times 1000), and costs and money budgets in nano-dollars,
 * so that every sum is exact in integers.
 */

#define RATEPOOL_PRICE_MAX       1000000    /* $1000 a million tokens */
#define RATEPOOL_NANO_PER_USD    1000000000

typedef struct {
    uint64_t   input;
    uint64_t   output;
    uint64_t   cache_write;
    uint64_t   cache_read;
} ratepool_price_t;


int ratepool_decimal_parse(const unsigned char *s, size_t len,
    unsigned decimals, uint64_t max, uint64_t *value);
uint64_t ratepool_price_cost(const ratepool_price_t *price, uint64_t input,
    uint64_t output, uint64_t cache_write, uint64_t cache_read);

int64_t ratepool_budget_period(int kind, time_t now);
time_t ratepool_budget_reset(int kind, time_t now);
uint64_t ratepool_budget_used(ratepool_budget_t *b, int kind, time_t now);
void ratepool_budget_add(ratepool_budget_t *b, int kind, time_t now,
    uint64_t tokens);
void ratepool_budget_raise(ratepool_budget_t *b, int kind, time_t now,
    uint64_t used);


#endif /* _RATEPOOL_BUDGET_H_INCLUDED_ */

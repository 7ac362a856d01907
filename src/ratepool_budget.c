
/*
 * Copyright (C) ratepool authors
 */


#include "ratepool_budget.h"
#include "ratepool_parse.h"


static void ratepool_civil_from_days(int64_t z, int64_t *y, unsigned *m);


int64_t
ratepool_budget_period(int kind, time_t now)
{
    int64_t   days, y;
    unsigned  m;

    days = (int64_t) now / 86400 - ((int64_t) now % 86400 < 0);

    if (kind == RATEPOOL_BUDGET_DAY) {
        return days;
    }

    ratepool_civil_from_days(days, &y, &m);

    return y * 12 + (m - 1);
}


/* when the period that holds "now" ends: the next midnight UTC, or the
 * first of the next month */

time_t
ratepool_budget_reset(int kind, time_t now)
{
    int64_t   period, y;
    unsigned  m;

    period = ratepool_budget_period(kind, now);

    if (kind == RATEPOOL_BUDGET_DAY) {
        return (time_t) ((period + 1) * 86400);
    }

    y = (period + 1) / 12;
    m = (unsigned) ((period + 1) % 12) + 1;

    return (time_t) (ratepool_days_from_civil(y, m, 1) * 86400);
}


uint64_t
ratepool_budget_used(ratepool_budget_t *b, int kind, time_t now)
{
    return b->period == ratepool_budget_period(kind, now) ? b->used : 0;
}


void
ratepool_budget_add(ratepool_budget_t *b, int kind, time_t now,
    uint64_t tokens)
{
    int64_t  period;

    period = ratepool_budget_period(kind, now);

    if (b->period != period) {
        b->period = period;
        b->used = 0;
    }

    /* saturates: no answer wraps a budget round to unspent */
    b->used = (b->used > UINT64_MAX - tokens) ? UINT64_MAX
                                                : b->used + tokens;
}


/* another count of the period that holds "now" (a fleet's): the larger */

void
ratepool_budget_raise(ratepool_budget_t *b, int kind, time_t now,
    uint64_t used)
{
    if (used > ratepool_budget_used(b, kind, now)) {
        b->used = used;
        b->period = ratepool_budget_period(kind, now);
    }
}


/*
 * "12", "3.75", "0.3": a decimal with up to "decimals" digits after the
 * point, as an integer of that many decimals (3.75, 3 decimals: 3750);
 * 0 if it is not one, or more than max (at most UINT64_MAX / 10).
 */

int
ratepool_decimal_parse(const unsigned char *s, size_t len,
    unsigned decimals, uint64_t max, uint64_t *value)
{
    size_t    i;
    unsigned  after;
    uint64_t  v;
    int       point, digits;

    v = 0;
    after = 0;
    point = 0;
    digits = 0;

    for (i = 0; i < len; i++) {
        if (s[i] == '.' && !point) {
            point = 1;
            continue;
        }

        if (s[i] < '0' || s[i] > '9' || (point && after == decimals)) {
            return 0;
        }

        /* v is at most max, which is far below UINT64_MAX / 10 */
        v = v * 10 + (uint64_t) (s[i] - '0');
        after += point;
        digits++;

        if (v > max) {
            return 0;
        }
    }

    if (digits == 0 || (point && after == 0)) {
        return 0;
    }

    for ( /* void */ ; after < decimals; after++) {
        if (v > max / 10) {
            return 0;
        }

        v *= 10;
    }

    if (v > max) {
        return 0;
    }

    *value = v;

    return 1;
}


/* what a request cost, in nano-dollars: each kind of token at its price */

uint64_t
ratepool_price_cost(const ratepool_price_t *price, uint64_t input,
    uint64_t output, uint64_t cache_write, uint64_t cache_read)
{
    /* prices are at most RATEPOOL_PRICE_MAX and usage is clamped far
       below 2^40 tokens of a kind: no product overflows */

    return input * price->input + output * price->output
           + cache_write * price->cache_write
           + cache_read * price->cache_read;
}


/* the proleptic Gregorian calendar, days counted from 1970-01-01 */

static void
ratepool_civil_from_days(int64_t z, int64_t *y, unsigned *m)
{
    int64_t   era;
    unsigned  doe, yoe, doy, mp;

    z += 719468;
    era = (z >= 0 ? z : z - 146096) / 146097;
    doe = (unsigned) (z - era * 146097);
    yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    mp = (5 * doy + 2) / 153;

    *m = mp < 10 ? mp + 3 : mp - 9;
    *y = (int64_t) yoe + era * 400 + (*m <= 2);
}

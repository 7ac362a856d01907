
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

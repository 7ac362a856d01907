
/*
 * Copyright (C) ratepool authors
 */


#include <string.h>

#include "ratepool_parse.h"


/* nothing a provider sends needs more; anything longer is rejected */
#define RATEPOOL_MAX_DIGITS      18
#define RATEPOOL_MAX_DELAY_MS    (365ULL * 86400 * 1000)


static void ratepool_trim(const unsigned char **p, size_t *len);
static int ratepool_digits(const unsigned char **pp, const unsigned char *end,
    size_t n, unsigned *value);
static int ratepool_make_time(int64_t year, unsigned month, unsigned day,
    unsigned hour, unsigned min, unsigned sec, time_t *t);


static void
ratepool_trim(const unsigned char **p, size_t *len)
{
    while (*len && (**p == ' ' || **p == '\t')) {
        (*p)++;
        (*len)--;
    }

    while (*len && ((*p)[*len - 1] == ' ' || (*p)[*len - 1] == '\t')) {
        (*len)--;
    }
}


int
ratepool_parse_uint(const unsigned char *p, size_t len, uint64_t *value)
{
    uint64_t  v;

    ratepool_trim(&p, &len);

    if (len == 0 || len > RATEPOOL_MAX_DIGITS) {
        return -1;
    }

    v = 0;

    while (len--) {
        if (*p < '0' || *p > '9') {
            return -1;
        }

        v = v * 10 + (uint64_t) (*p++ - '0');
    }

    *value = v;

    return 0;
}


/*
 * delta-seconds (the SDKs also accept a fraction) or an HTTP-date;
 * a date in the past means "now".
 */

int
ratepool_parse_retry_after(const unsigned char *p, size_t len, time_t now_sec,
    uint64_t *delay_ms)
{
    size_t    i, frac;
    time_t    t;
    uint64_t  sec, ms, scale;

    ratepool_trim(&p, &len);

    if (len == 0) {
        return -1;
    }

    if (*p >= '0' && *p <= '9') {

        for (i = 0; i < len && p[i] != '.'; i++) { /* void */ }

        if (ratepool_parse_uint(p, i, &sec) != 0) {
            return -1;
        }

        ms = 0;

        if (i < len) {
            i++;
            scale = 100;

            for (frac = 0; i < len; i++, frac++) {
                if (p[i] < '0' || p[i] > '9' || frac >= RATEPOOL_MAX_DIGITS) {
                    return -1;
                }

                ms += (uint64_t) (p[i] - '0') * scale;
                scale /= 10;
            }
        }

        if (sec >= RATEPOOL_MAX_DELAY_MS / 1000) {
            *delay_ms = RATEPOOL_MAX_DELAY_MS;
            return 0;
        }

        *delay_ms = sec * 1000 + ms;

        return 0;
    }

    if (ratepool_parse_http_date(p, len, &t) != 0) {
        return -1;
    }

    if (t <= now_sec) {
        *delay_ms = 0;

    } else if ((uint64_t) (t - now_sec) > RATEPOOL_MAX_DELAY_MS / 1000) {
        *delay_ms = RATEPOOL_MAX_DELAY_MS;

    } else {
        *delay_ms = (uint64_t) (t - now_sec) * 1000;
    }

    return 0;
}


/* IMF-fixdate only, which is what RFC 9110 senders must use:
 * "Sun, 06 Nov 1994 08:49:37 GMT" */

int
ratepool_parse_http_date(const unsigned char *p, size_t len, time_t *sec)
{
    static const char     months[] = "JanFebMarAprMayJunJulAugSepOctNovDec";
    unsigned              day, month, year, hour, min, s, i;
    const unsigned char  *end;

    ratepool_trim(&p, &len);

    if (len != 29) {
        return -1;
    }

    end = p + len;

    if (p[3] != ',' || p[4] != ' ' || p[7] != ' ' || p[11] != ' '
        || p[16] != ' ' || p[19] != ':' || p[22] != ':' || p[25] != ' '
        || p[26] != 'G' || p[27] != 'M' || p[28] != 'T')
    {
        return -1;
    }

    p += 5;

    if (ratepool_digits(&p, end, 2, &day) != 0) {
        return -1;
    }

    p++;

    for (i = 0; i < 12; i++) {
        if (p[0] == months[i * 3] && p[1] == months[i * 3 + 1]
            && p[2] == months[i * 3 + 2])
        {
            break;
        }
    }

    if (i == 12) {
        return -1;
    }

    month = i + 1;
    p += 4;

    if (ratepool_digits(&p, end, 4, &year) != 0) {
        return -1;
    }

    p++;

    if (ratepool_digits(&p, end, 2, &hour) != 0) {
        return -1;
    }

    p++;

    if (ratepool_digits(&p, end, 2, &min) != 0) {
        return -1;
    }

    p++;

    if (ratepool_digits(&p, end, 2, &s) != 0) {
        return -1;
    }

    return ratepool_make_time(year, month, day, hour, min, s, sec);
}


/* "2025-08-21T12:40:59Z", with an optional fraction and numeric offset */

int
ratepool_parse_rfc3339(const unsigned char *p, size_t len, time_t *sec)
{
    time_t                t;
    unsigned              year, month, day, hour, min, s, oh, om;
    const unsigned char  *end;

    ratepool_trim(&p, &len);

    end = p + len;

    if (ratepool_digits(&p, end, 4, &year) != 0
        || p == end || *p++ != '-'
        || ratepool_digits(&p, end, 2, &month) != 0
        || p == end || *p++ != '-'
        || ratepool_digits(&p, end, 2, &day) != 0
        || p == end || (*p != 'T' && *p != 't' && *p != ' ')
        || (p++, ratepool_digits(&p, end, 2, &hour) != 0)
        || p == end || *p++ != ':'
        || ratepool_digits(&p, end, 2, &min) != 0
        || p == end || *p++ != ':'
        || ratepool_digits(&p, end, 2, &s) != 0)
    {
        return -1;
    }

    if (p < end && *p == '.') {
        p++;

        if (p == end || *p < '0' || *p > '9') {
            return -1;
        }

        while (p < end && *p >= '0' && *p <= '9') {
            p++;
        }
    }

    if (ratepool_make_time(year, month, day, hour, min, s, &t) != 0) {
        return -1;
    }

    if (p < end && (*p == 'Z' || *p == 'z') && p + 1 == end) {
        *sec = t;
        return 0;
    }

    if (end - p == 6 && (*p == '+' || *p == '-') && p[3] == ':') {
        const unsigned char  *q = p + 1;

        if (ratepool_digits(&q, end, 2, &oh) != 0) {
            return -1;
        }

        q++;

        if (ratepool_digits(&q, end, 2, &om) != 0 || oh > 23 || om > 59) {
            return -1;
        }

        /* local time minus its offset from UTC */
        if (*p == '+') {
            *sec = t - (time_t) (oh * 3600 + om * 60);

        } else {
            *sec = t + (time_t) (oh * 3600 + om * 60);
        }

        return 0;
    }

    return -1;
}


/* Go-style durations as OpenAI sends them: "1s", "6m0s", "20ms", "1.5s",
 * "2s81ms", "1h2m3s" */

int
ratepool_parse_duration_ms(const unsigned char *p, size_t len, uint64_t *ms)
{
    uint64_t              whole, frac, scale, unit, total;
    unsigned              digits;
    const unsigned char  *end;

    ratepool_trim(&p, &len);

    if (len == 0) {
        return -1;
    }

    end = p + len;
    total = 0;

    while (p < end) {

        whole = 0;
        digits = 0;

        while (p < end && *p >= '0' && *p <= '9') {
            if (++digits > RATEPOOL_MAX_DIGITS / 2) {
                return -1;
            }

            whole = whole * 10 + (uint64_t) (*p++ - '0');
        }

        /* fraction in millionths, enough for "ms" with a fraction */
        frac = 0;

        if (p < end && *p == '.') {
            p++;
            scale = 100000;

            if (p == end || *p < '0' || *p > '9') {
                return -1;
            }

            while (p < end && *p >= '0' && *p <= '9') {
                frac += (uint64_t) (*p++ - '0') * scale;
                scale /= 10;
            }
        }

        if (digits == 0) {
            return -1;
        }

        if (p < end && *p == 'h') {
            unit = 3600000;
            p++;

        } else if (end - p >= 2 && p[0] == 'm' && p[1] == 's') {
            unit = 1;
            p += 2;

        } else if (p < end && *p == 'm') {
            unit = 60000;
            p++;

        } else if (p < end && *p == 's') {
            unit = 1000;
            p++;

        } else {
            return -1;
        }

        total += whole * unit + frac * unit / 1000000;

        if (total > RATEPOOL_MAX_DELAY_MS) {
            total = RATEPOOL_MAX_DELAY_MS;
        }
    }

    *ms = total;

    return 0;
}


static int
ratepool_digits(const unsigned char **pp, const unsigned char *end, size_t n,
    unsigned *value)
{
    unsigned              v;
    const unsigned char  *p;

    p = *pp;

    if ((size_t) (end - p) < n) {
        return -1;
    }

    v = 0;

    while (n--) {
        if (*p < '0' || *p > '9') {
            return -1;
        }

        v = v * 10 + (unsigned) (*p++ - '0');
    }

    *pp = p;
    *value = v;

    return 0;
}


/* days since 1970-01-01 in the proleptic Gregorian calendar */

int64_t
ratepool_days_from_civil(int64_t y, unsigned m, unsigned d)
{
    int64_t   era;
    unsigned  yoe, doy, doe, mp;

    y -= m <= 2;
    era = (y >= 0 ? y : y - 399) / 400;
    yoe = (unsigned) (y - era * 400);
    mp = m > 2 ? m - 3 : m + 9;
    doy = (153 * mp + 2) / 5 + d - 1;
    doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;

    return era * 146097 + (int64_t) doe - 719468;
}


static int
ratepool_make_time(int64_t year, unsigned month, unsigned day, unsigned hour,
    unsigned min, unsigned sec, time_t *t)
{
    static const unsigned  mdays[] = { 31, 29, 31, 30, 31, 30,
                                       31, 31, 30, 31, 30, 31 };

    if (year < 1970 || year > 9999 || month < 1 || month > 12 || day < 1
        || day > mdays[month - 1] || hour > 23 || min > 59 || sec > 60)
    {
        return -1;
    }

    *t = (time_t) (ratepool_days_from_civil(year, month, day) * 86400
                   + hour * 3600 + min * 60 + sec);

    return 0;
}

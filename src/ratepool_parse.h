
/*
 * Copyright (C) ratepool authors
 */


#ifndef _RATEPOOL_PARSE_H_INCLUDED_
#define _RATEPOOL_PARSE_H_INCLUDED_


#include <stddef.h>
#include <stdint.h>
#include <time.h>


/* parsers of provider header values; each returns 0 on success, -1 if
 * the value is malformed, and never reads past len */

int ratepool_parse_uint(const unsigned char *p, size_t len, uint64_t *value);
int ratepool_parse_retry_after(const unsigned char *p, size_t len,
    time_t now_sec, uint64_t *delay_ms);
int ratepool_parse_http_date(const unsigned char *p, size_t len,
    time_t *sec);
int ratepool_parse_rfc3339(const unsigned char *p, size_t len, time_t *sec);
int ratepool_parse_duration_ms(const unsigned char *p, size_t len,
    uint64_t *ms);

int64_t ratepool_days_from_civil(int64_t y, unsigned m, unsigned d);


#endif /* _RATEPOOL_PARSE_H_INCLUDED_ */

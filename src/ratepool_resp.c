
/*
 * Copyright (C) ratepool authors
 */


#include <string.h>

#include "ratepool_resp.h"


static size_t
ratepool_resp_digits(uint64_t n)
{
    size_t  d;

    for (d = 1; n >= 10; n /= 10) {
        d++;
    }

    return d;
}


/* decimal digits of n, no terminator */

unsigned char *
ratepool_resp_uint(unsigned char *p, uint64_t n)
{
    size_t  d, i;

    d = ratepool_resp_digits(n);

    for (i = d; i > 0; i--) {
        p[i - 1] = (unsigned char) ('0' + n % 10);
        n /= 10;
    }

    return p + d;
}


/* "*3\r\n" */

size_t
ratepool_resp_header_size(size_t nargs)
{
    return 1 + ratepool_resp_digits(nargs) + 2;
}


unsigned char *
ratepool_resp_header(unsigned char *p, size_t nargs)
{
    *p++ = '*';
    p = ratepool_resp_uint(p, nargs);
    *p++ = '\r';
    *p++ = '\n';

    return p;
}


/* "$5\r\nhello\r\n" */

size_t
ratepool_resp_arg_size(size_t len)
{
    return 1 + ratepool_resp_digits(len) + 2 + len + 2;
}


unsigned char *
ratepool_resp_arg(unsigned char *p, const unsigned char *data, size_t len)
{
    *p++ = '$';
    p = ratepool_resp_uint(p, len);
    *p++ = '\r';
    *p++ = '\n';

    if (len) {
        memcpy(p, data, len);
        p += len;
    }

    *p++ = '\r';
    *p++ = '\n';

    return p;
}


/* a whole command; 0 if it does not fit in size bytes */

size_t
ratepool_resp_format(unsigned char *buf, size_t size,
    const ratepool_resp_arg_t *args, size_t nargs)
{
    size_t          i, need;
    unsigned char  *p;

    need = ratepool_resp_header_size(nargs);

    for (i = 0; i < nargs; i++) {
        need += ratepool_resp_arg_size(args[i].len);
    }

    if (need > size) {
        return 0;
    }

    p = ratepool_resp_header(buf, nargs);

    for (i = 0; i < nargs; i++) {
        p = ratepool_resp_arg(p, args[i].data, args[i].len);
    }

    return (size_t) (p - buf);
}

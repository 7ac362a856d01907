
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


enum {
    RESP_TYPE = 0,
    RESP_LINE,
    RESP_LINE_LF,
    RESP_BULK,
    RESP_BULK_CR,
    RESP_BULK_LF
};


void
ratepool_resp_check_init(ratepool_resp_check_t *c)
{
    c->state = RESP_TYPE;
    c->depth = 0;
    c->error = RATEPOOL_RESP_OK;
}


/* an element is complete: the arrays it ends are too */

static void
ratepool_resp_element(ratepool_resp_check_t *c)
{
    while (c->depth && --c->left[c->depth - 1] == 0) {
        c->depth--;
    }
}


/* a "*", "$" or ":" line is a number; "+" and "-" lines are text */

static int
ratepool_resp_line_end(ratepool_resp_check_t *c)
{
    if (c->type == '+' || c->type == '-') {
        ratepool_resp_element(c);
        return RATEPOOL_RESP_OK;
    }

    if (c->digits == 0) {
        return RATEPOOL_RESP_BAD;
    }

    if (c->negative) {
        /* a nil array or bulk string is one element; ":" may be negative */
        if (c->type != ':' && c->number != 1) {
            return RATEPOOL_RESP_BAD;
        }

        ratepool_resp_element(c);
        return RATEPOOL_RESP_OK;
    }

    switch (c->type) {

    case '*':
        if (c->number > RATEPOOL_RESP_ELEMENTS_MAX) {
            return RATEPOOL_RESP_TOO_LARGE;
        }

        if (c->number == 0) {
            ratepool_resp_element(c);
            return RATEPOOL_RESP_OK;
        }

        if (c->depth == RATEPOOL_RESP_DEPTH_MAX) {
            return RATEPOOL_RESP_TOO_LARGE;
        }

        c->left[c->depth++] = c->number;
        return RATEPOOL_RESP_OK;

    case '$':
        if (c->number > RATEPOOL_RESP_BULK_MAX) {
            return RATEPOOL_RESP_TOO_LARGE;
        }

        c->bulk_left = c->number;
        c->state = c->number ? RESP_BULK : RESP_BULK_CR;
        return RATEPOOL_RESP_OK;

    default: /* ':' */
        ratepool_resp_element(c);
        return RATEPOOL_RESP_OK;
    }
}


int
ratepool_resp_check(ratepool_resp_check_t *c, const unsigned char *p,
    size_t len)
{
    size_t         n;
    unsigned char  ch;

    while (len && c->error == RATEPOOL_RESP_OK) {

        switch (c->state) {

        case RESP_TYPE:
            ch = *p++;
            len--;

            if (ch != '*' && ch != '$' && ch != ':' && ch != '+'
                && ch != '-')
            {
                c->error = RATEPOOL_RESP_BAD;
                break;
            }

            c->type = ch;
            c->line_len = 0;
            c->digits = 0;
            c->negative = 0;
            c->number = 0;
            c->state = RESP_LINE;
            break;

        case RESP_LINE:
            ch = *p++;
            len--;

            if (ch == '\r') {
                c->state = RESP_LINE_LF;
                break;
            }

            if (++c->line_len > RATEPOOL_RESP_LINE_MAX) {
                c->error = RATEPOOL_RESP_TOO_LARGE;
                break;
            }

            if (c->type == '+' || c->type == '-') {
                if (ch == '\n') {
                    c->error = RATEPOOL_RESP_BAD;
                }

                break;
            }

            if (ch == '-' && c->line_len == 1) {
                c->negative = 1;
                break;
            }

            if (ch < '0' || ch > '9' || c->digits == 19) {
                c->error = (ch >= '0' && ch <= '9') ? RATEPOOL_RESP_TOO_LARGE
                                                    : RATEPOOL_RESP_BAD;
                break;
            }

            c->number = c->number * 10 + (ch - '0');
            c->digits++;
            break;

        case RESP_LINE_LF:
            ch = *p++;
            len--;

            if (ch != '\n') {
                c->error = RATEPOOL_RESP_BAD;
                break;
            }

            c->state = RESP_TYPE;
            c->error = ratepool_resp_line_end(c);
            break;

        case RESP_BULK:
            n = len < c->bulk_left ? len : (size_t) c->bulk_left;
            p += n;
            len -= n;
            c->bulk_left -= n;

            if (c->bulk_left == 0) {
                c->state = RESP_BULK_CR;
            }

            break;

        case RESP_BULK_CR:
            c->error = (*p++ == '\r') ? RATEPOOL_RESP_OK : RATEPOOL_RESP_BAD;
            len--;
            c->state = RESP_BULK_LF;
            break;

        default: /* RESP_BULK_LF */
            c->error = (*p++ == '\n') ? RATEPOOL_RESP_OK : RATEPOOL_RESP_BAD;
            len--;
            c->state = RESP_TYPE;
            ratepool_resp_element(c);
            break;
        }
    }

    return c->error;
}

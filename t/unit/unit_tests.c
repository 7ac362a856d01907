/*
 * Unit tests of ratepool's pure logic: bucket arithmetic, key choice,
 * cooldowns and header parsers.  Prints TAP, so prove runs it.
 */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ratepool_bucket.h"
#include "ratepool_limits.h"
#include "ratepool_pick.h"
#include "ratepool_parse.h"
#include "ratepool_dialect.h"
#include "ratepool_usage.h"
#include "ratepool_budget.h"
#include "ratepool_request.h"
#include "ratepool_home.h"
#include "ratepool_conversation.h"
#include "ratepool_resp.h"
#include "ratepool_sigv4.h"
#include "ratepool_eventstream.h"
#include "ratepool_jwt.h"

#include <openssl/rsa.h>


static int  tests, failures;


#define check(cond, name)                                                    \
    do {                                                                     \
        tests++;                                                             \
        if (cond) {                                                          \
            printf("ok %d - %s\n", tests, name);                             \
        } else {                                                             \
            failures++;                                                      \
            printf("not ok %d - %s\n# at %s:%d: %s\n", tests, name,          \
                   __FILE__, __LINE__, #cond);                               \
        }                                                                    \
    } while (0)


#define S(s)  (const unsigned char *) (s), strlen(s)


static void
test_bucket(void)
{
    int                rc;
    uint64_t           wait, i, taken;
    ratepool_bucket_t  b;

    ratepool_bucket_init(&b, 60, 1000);
    check(ratepool_bucket_level(&b, 60, 1000) == 60,
          "a new bucket starts full");

    for (taken = 0, i = 0; i < 100; i++) {
        if (ratepool_bucket_take(&b, 60, 1, 1000, &wait) == RATEPOOL_BUCKET_OK)
        {
            taken++;
        }
    }

    check(taken == 60, "a burst takes exactly the capacity");

    rc = ratepool_bucket_take(&b, 60, 1, 1000, &wait);
    check(rc == RATEPOOL_BUCKET_WAIT && wait == 1000,
          "60 rpm refills one request per second, so the wait is 1000 ms");

    rc = ratepool_bucket_take(&b, 60, 1, 1999, &wait);
    check(rc == RATEPOOL_BUCKET_WAIT && wait == 1,
          "the refill is continuous: 999 ms later 1 ms is left to wait");

    rc = ratepool_bucket_take(&b, 60, 1, 2000, &wait);
    check(rc == RATEPOOL_BUCKET_OK, "one second later one request fits");

    check(ratepool_bucket_level(&b, 60, 2000 + 3600000) == 60,
          "refill never goes above capacity");

    ratepool_bucket_init(&b, 7, 0);
    check(ratepool_bucket_take(&b, 7, 8, 0, &wait) == RATEPOOL_BUCKET_NEVER,
          "a cost above the limit can never fit");

    check(ratepool_bucket_take(&b, 0, 1000000, 0, &wait) == RATEPOOL_BUCKET_OK
          && wait == 0, "an unknown limit (0) never refuses");

    /* 50 rpm: 1.2 s per request, slow rates must not round away */
    ratepool_bucket_init(&b, 50, 0);
    b.level = 0;
    check(ratepool_bucket_wait_ms(&b, 50, 1, 0) == 1200,
          "50 rpm waits 1200 ms for one request from empty");
    check(ratepool_bucket_wait_ms(&b, 50, 1, 600) == 600,
          "half-way the wait is halved");

    ratepool_bucket_init(&b, 10, 0);
    ratepool_bucket_clamp(&b, 10, 3, 0);
    check(ratepool_bucket_level(&b, 10, 0) == 3,
          "a provider's lower remaining count clamps the level");
    ratepool_bucket_clamp(&b, 10, 8, 0);
    check(ratepool_bucket_level(&b, 10, 0) == 3,
          "a higher remaining count never raises it");

    ratepool_bucket_put(&b, 10, 100);
    check(ratepool_bucket_level(&b, 10, 0) == 10,
          "a refund never overfills");

    ratepool_bucket_init(&b, 1, 0);
    b.level = -5 * RATEPOOL_MILLI;
    check(ratepool_bucket_wait_ms(&b, 1, 1, 0) == 6 * 60000,
          "debt is repaid before anything fits");

    ratepool_bucket_init(&b, 600, 0);
    ratepool_bucket_debit(&b, 600, 900, 0);
    check(ratepool_bucket_wait_ms(&b, 600, 1, 0) == 30100,
          "a debit past the level is debt, repaid before one token fits");
    ratepool_bucket_debit(&b, 600, 1000000000, 0);
    check(ratepool_bucket_wait_ms(&b, 600, 1, 0) == 60000 + 100,
          "debt is capped at a minute of refill");

    ratepool_bucket_init(&b, 100, 5000);
    check(ratepool_bucket_level(&b, 100, 4000) == 100,
          "time going backwards changes nothing");

    ratepool_bucket_init(&b, 10000000000000000ULL, 0);
    rc = ratepool_bucket_take(&b, 10000000000000000ULL, 1, 0, &wait);
    check(rc == RATEPOOL_BUCKET_OK && wait == 0,
          "an absurd learned limit is clamped, not an endless wait");
    check(ratepool_bucket_level(&b, 999999999999999999ULL, 10)
          == RATEPOOL_BUCKET_MAX, "and never wraps the level around");

    ratepool_bucket_init(&b, 10000000, 0);
    b.level = 0;
    check(ratepool_bucket_level(&b, 10000000, 30000) == 5000000,
          "large token limits refill without overflow");
}


static void
test_pick(void)
{
    long                  i;
    uint64_t              soonest;
    ratepool_candidate_t  c[4];

    memset(c, 0, sizeof(c));

    c[0].usable = 1; c[0].headroom_permille = 1000;
    c[1].usable = 1; c[1].headroom_permille = 200;
    c[2].usable = 1; c[2].headroom_permille = 900;

    i = ratepool_pick(c, 3, 100, &soonest);
    check(i == 0, "the key whose org has the most headroom is chosen");

    c[0].org_inflight = 3;
    c[2].headroom_permille = 1000;
    i = ratepool_pick(c, 3, 100, &soonest);
    check(i == 2, "with equal headroom the org with fewer in flight wins");

    c[0].org_inflight = 0;
    c[0].key_inflight = 1;
    i = ratepool_pick(c, 3, 100, &soonest);
    check(i == 2, "then the key with fewer in flight");

    c[0].key_inflight = 0;
    c[0].last_pick_ms = 90;
    c[2].last_pick_ms = 50;
    i = ratepool_pick(c, 3, 100, &soonest);
    check(i == 2, "then the key used longest ago");

    c[0].headroom_permille = 990;
    c[2].headroom_permille = 1000;
    c[2].org_inflight = 1;
    i = ratepool_pick(c, 3, 100, &soonest);
    check(i == 0, "small headroom differences do not beat load spreading");

    c[0].free_at_ms = 5000;
    c[2].free_at_ms = 3000;
    i = ratepool_pick(c, 3, 100, &soonest);
    check(i == 1, "keys cooling down are skipped even with more headroom");

    c[1].usable = 0;
    i = ratepool_pick(c, 3, 100, &soonest);
    check(i == -1 && soonest == 3000,
          "with every key cooling the soonest end is reported");

    c[0].usable = 0;
    c[2].usable = 0;
    i = ratepool_pick(c, 3, 100, &soonest);
    check(i == -1 && soonest == 0, "with no usable key soonest is 0");

    i = ratepool_pick(c, 0, 100, &soonest);
    check(i == -1, "an empty pool picks nothing");
}


static void
test_cooldown(void)
{
    int       ok;
    uint64_t  until, longest;
    uint32_t  r;

    ok = 1;

    for (r = 0; r < 100000; r += 7) {
        until = ratepool_cooldown_until(0, 1000, 7000, r);

        if (until <= 1000 + 7000 || until > 1000 + 7000 + 1000) {
            ok = 0;
        }
    }

    check(ok, "retry-after is a floor and the jitter is positive and small");

    longest = ratepool_cooldown_until(0, 0, 30000, 12345);
    until = ratepool_cooldown_until(longest, 1000, 1000, 999);
    check(until == longest, "a shorter retry-after never shortens a cooldown");

    until = ratepool_cooldown_until(longest, 1000, 60000, 0);
    check(until > longest, "a longer one extends it");

    check(ratepool_backoff_ms(0) == 2000 && ratepool_backoff_ms(1) == 4000
          && ratepool_backoff_ms(10) == 60000,
          "without retry-after the backoff doubles up to a minute");

    check(ratepool_retry_after_sec(0, 0) == 1,
          "the gateway's retry-after is at least 1 s");
    check(ratepool_retry_after_sec(3600000, 5) == 60,
          "and at most 60 s, which clients still honour");
    check(ratepool_retry_after_sec(2000, 0) == 2
          && ratepool_retry_after_sec(2001, 0) == 3,
          "whole seconds, never earlier than the wait");
}


static void
test_parse(void)
{
    time_t    t;
    uint64_t  v;

    check(ratepool_parse_uint(S("  1000 "), &v) == 0 && v == 1000,
          "integers with spaces");
    check(ratepool_parse_uint(S("10a"), &v) == -1, "garbage integers fail");
    check(ratepool_parse_uint(S(""), &v) == -1, "empty integers fail");
    check(ratepool_parse_uint(S("99999999999999999999999"), &v) == -1,
          "overlong integers fail instead of wrapping");

    check(ratepool_parse_retry_after(S("7"), 0, &v) == 0 && v == 7000,
          "retry-after in seconds");
    check(ratepool_parse_retry_after(S("1.5"), 0, &v) == 0 && v == 1500,
          "retry-after with a fraction");
    check(ratepool_parse_retry_after(S("Sun, 06 Nov 1994 08:49:37 GMT"),
                                     784111770, &v) == 0 && v == 7000,
          "retry-after as an HTTP-date");
    check(ratepool_parse_retry_after(S("Sun, 06 Nov 1994 08:49:37 GMT"),
                                     784111790, &v) == 0 && v == 0,
          "an HTTP-date in the past means now");
    check(ratepool_parse_retry_after(S("soon"), 0, &v) == -1,
          "nonsense retry-after fails");
    check(ratepool_parse_retry_after(S("-3"), 0, &v) == -1,
          "negative retry-after fails");
    check(ratepool_parse_retry_after(S("99999999999"), 0, &v) == 0
          && v == 365ULL * 86400 * 1000,
          "absurd retry-after is capped at a year");
    check(ratepool_parse_retry_after(S("555555555555285.2"), 0, &v) == 0
          && v == 365ULL * 86400 * 1000,
          "with a fraction too (found by the fuzzer)");

    check(ratepool_parse_rfc3339(S("2025-08-21T12:40:59Z"), &t) == 0
          && t == 1755780059, "RFC 3339 in UTC");
    check(ratepool_parse_rfc3339(S("2025-08-21T12:40:59.123Z"), &t) == 0
          && t == 1755780059, "RFC 3339 with a fraction");
    check(ratepool_parse_rfc3339(S("2025-08-21T14:40:59+02:00"), &t) == 0
          && t == 1755780059, "RFC 3339 with an offset");
    check(ratepool_parse_rfc3339(S("2024-02-29T00:00:00Z"), &t) == 0
          && t == 1709164800, "RFC 3339 on a leap day");
    check(ratepool_parse_rfc3339(S("2025-13-01T00:00:00Z"), &t) == -1,
          "month 13 fails");
    check(ratepool_parse_rfc3339(S("2025-08-21T12:40:59"), &t) == -1,
          "a time without zone fails");
    check(ratepool_parse_rfc3339(S("2025-08-21"), &t) == -1,
          "a date alone fails");

    check(ratepool_parse_duration_ms(S("6m0s"), &v) == 0 && v == 360000,
          "OpenAI duration 6m0s");
    check(ratepool_parse_duration_ms(S("20ms"), &v) == 0 && v == 20,
          "OpenAI duration 20ms");
    check(ratepool_parse_duration_ms(S("2s81ms"), &v) == 0 && v == 2081,
          "OpenAI duration 2s81ms");
    check(ratepool_parse_duration_ms(S("1.5s"), &v) == 0 && v == 1500,
          "OpenAI duration 1.5s");
    check(ratepool_parse_duration_ms(S("1h2m3s"), &v) == 0
          && v == 3723000, "OpenAI duration 1h2m3s");
    check(ratepool_parse_duration_ms(S("5"), &v) == -1,
          "a duration without unit fails");
    check(ratepool_parse_duration_ms(S("s"), &v) == -1,
          "a unit without number fails");

    check(ratepool_parse_http_date(S("Sun, 06 Nov 1994 08:49:37 GMT"), &t)
          == 0 && t == 784111777, "HTTP-date");
    check(ratepool_parse_http_date(S("Sun, 06 Foo 1994 08:49:37 GMT"), &t)
          == -1, "HTTP-date with a bad month fails");
}


static const char  anthropic_stream[] =
    "event: message_start\n"
    "data: {\"type\": \"message_start\", \"message\": {\"id\": \"msg_1\", "
    "\"type\": \"message\", \"role\": \"assistant\", \"content\": [], "
    "\"model\": \"claude-sonnet-4-6\", \"stop_reason\": null, "
    "\"usage\": {\"input_tokens\": 25, \"cache_creation_input_tokens\": 7, "
    "\"cache_read_input_tokens\": 1200, \"output_tokens\": 1}}}\n"
    "\n"
    "event: content_block_start\n"
    "data: {\"type\": \"content_block_start\", \"index\": 0, "
    "\"content_block\": {\"type\": \"text\", \"text\": \"\"}}\n"
    "\n"
    "event: ping\n"
    "data: {\"type\": \"ping\"}\n"
    "\n"
    ": a comment line\n"
    "event: content_block_delta\n"
    "data: {\"type\": \"content_block_delta\", \"index\": 0, \"delta\": "
    "{\"type\": \"text_delta\", \"text\": \"{\\\"usage\\\": "
    "{\\\"output_tokens\\\": 99999}}\"}}\n"
    "\n"
    "event: message_delta\n"
    "data: {\"type\": \"message_delta\", \"delta\": {\"stop_reason\": "
    "\"end_turn\"}, \"usage\": {\"output_tokens\": 15}}\n"
    "\n"
    "event: message_delta\n"
    "data: {\"type\": \"message_delta\", \"delta\": {}, "
    "\"usage\": {\"output_tokens\": 42}}\n"
    "\n"
    "event: message_stop\n"
    "data: {\"type\": \"message_stop\"}\n"
    "\n";


static void
usage_scan(ratepool_usage_t *u, int sse, const char *text, size_t piece)
{
    size_t                    len, n;
    ratepool_usage_scanner_t  s;

    ratepool_usage_init(&s, sse);

    len = strlen(text);

    while (len) {
        n = (piece && piece < len) ? piece : len;
        ratepool_usage_feed(&s, (const unsigned char *) text, n);
        text += n;
        len -= n;
    }

    ratepool_usage_finish(&s);
    *u = s.usage;
}


static int
usage_same(ratepool_usage_t *a, ratepool_usage_t *b)
{
    return a->input_tokens == b->input_tokens
           && a->output_tokens == b->output_tokens
           && a->cache_creation_input_tokens == b->cache_creation_input_tokens
           && a->cache_read_input_tokens == b->cache_read_input_tokens
           && a->cached_tokens == b->cached_tokens
           && a->seen == b->seen && a->error_event == b->error_event
           && a->events == b->events && a->text_bytes == b->text_bytes;
}


static void
test_usage_estimate(void)
{
    size_t                  cut;
    ratepool_usage_t        u;
    ratepool_usage_guess_t  g;

    g.input = 300;
    g.input_full = 1000;
    g.output = 50;

    usage_scan(&u, 1, anthropic_stream, 0);
    check(u.text_bytes == 35 && (u.seen & RATEPOOL_USAGE_FINAL),
          "the text a stream carried is counted, and its last usage seen");
    check(!ratepool_usage_estimate(&u, &g, RATEPOOL_USAGE_READ, 1, 1)
          && u.output_tokens == 42 && u.input_tokens == 25,
          "a stream that said what it used is not estimated");

    cut = strstr(anthropic_stream, "event: message_delta") - anthropic_stream;
    {
        char  head[sizeof(anthropic_stream)];

        memcpy(head, anthropic_stream, cut);
        head[cut] = '\0';
        usage_scan(&u, 1, head, 0);
    }

    check(u.output_tokens == 1 && !(u.seen & RATEPOOL_USAGE_FINAL),
          "a stream cut after its text has only message_start's output");
    check(ratepool_usage_estimate(&u, &g, RATEPOOL_USAGE_READ, 1, 1)
          && u.output_tokens == 9 && u.input_tokens == 25
          && (u.seen & RATEPOOL_USAGE_ESTIMATED),
          "and is charged a token per 4 bytes of text, its input as said");

    usage_scan(&u, 1, "data: {\"choices\":[{\"index\":0,\"delta\":"
                      "{\"content\":\"Hello world\"}}]}\n\n"
                      "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{"
                      "\"index\":0,\"function\":{\"arguments\":"
                      "\"{\\\"a\\\":1}\"}}]}}]}\n\n"
                      "data: {\"type\":\"response.output_text.delta\","
                      "\"delta\":\"abcd\"}\n\n"
                      "data: {\"type\":\"response.output_text.done\","
                      "\"text\":\"abcd\",\"content\":\"abcd\"}\n\n", 7);
    check(u.text_bytes == 11 + 7 + 4 && u.seen == 0,
          "OpenAI's text and tool arguments in deltas count, whole texts "
          "repeated at the end do not");
    check(ratepool_usage_estimate(&u, &g, RATEPOOL_USAGE_READ, 1, 1)
          && u.input_tokens == 300 && u.cache_read_input_tokens == 700
          && u.output_tokens == 6,
          "without usage: the input estimate, the rest of the prompt as "
          "cache reads, output from the text");

    memset(&u, 0, sizeof(u));
    check(ratepool_usage_estimate(&u, &g, RATEPOOL_USAGE_UNANSWERED, 0, 0)
          && u.input_tokens == 300 && u.output_tokens == 0,
          "a request never answered is charged its input");

    memset(&u, 0, sizeof(u));
    check(ratepool_usage_estimate(&u, &g, RATEPOOL_USAGE_UNREAD, 1, 1)
          && u.input_tokens == 300 && u.output_tokens == 50,
          "an answer that cannot be read its input and reserved output");

    usage_scan(&u, 0, "{\"content\":[{\"type\":\"text\",\"text\":"
                      "\"hi\"}],\"usage\":{\"input_tokens\":7", 0);
    check(ratepool_usage_estimate(&u, &g, RATEPOOL_USAGE_READ, 0, 0)
          && u.input_tokens == 7 && u.output_tokens == 50,
          "a JSON answer cut before its output count: the reserved output");

    usage_scan(&u, 0, "{\"object\":\"list\",\"usage\":{\"prompt_tokens\":"
                      "8,\"total_tokens\":8}}", 0);
    check(!ratepool_usage_estimate(&u, &g, RATEPOOL_USAGE_READ, 0, 1)
          && u.input_tokens == 8 && u.output_tokens == 0,
          "a whole answer that reports no output had none (an embedding)");
}


static void
test_usage(void)
{
    int                       ok;
    char                     *crlf, *q;
    size_t                    i, split;
    const char               *p;
    ratepool_usage_t          whole, part;
    ratepool_usage_scanner_t  s;

    usage_scan(&whole, 1, anthropic_stream, 0);

    check(whole.input_tokens == 25 && whole.cache_creation_input_tokens == 7
          && whole.cache_read_input_tokens == 1200,
          "a stream's input usage comes from message_start");
    check(whole.output_tokens == 42,
          "output tokens are the last cumulative message_delta value");
    check(whole.events == 7 && !whole.error_event,
          "every event is seen, comments are not events");

    ok = 1;

    for (i = 1; i < 64; i++) {
        usage_scan(&part, 1, anthropic_stream, i);
        ok &= usage_same(&whole, &part);
    }

    check(ok, "pieces of any size from 1 to 63 bytes read the same");

    ok = 1;

    for (split = 1; split < strlen(anthropic_stream); split++) {
        ratepool_usage_init(&s, 1);
        ratepool_usage_feed(&s, (const unsigned char *) anthropic_stream,
                            split);
        ratepool_usage_feed(&s, (const unsigned char *) anthropic_stream
                                + split,
                            strlen(anthropic_stream) - split);
        ok &= usage_same(&whole, &s.usage);
    }

    check(ok, "a split at every byte boundary reads the same");

    crlf = malloc(2 * sizeof(anthropic_stream));
    for (p = anthropic_stream, q = crlf; *p; p++) {
        if (*p == '\n') {
            *q++ = '\r';
        }
        *q++ = *p;
    }
    *q = '\0';

    usage_scan(&part, 1, crlf, 3);
    check(usage_same(&whole, &part), "CRLF line ends read the same");

    for (q = crlf, p = anthropic_stream; *p; p++) {
        *q++ = (*p == '\n') ? '\r' : *p;
    }
    *q = '\0';

    usage_scan(&part, 1, crlf, 5);
    check(usage_same(&whole, &part), "CR line ends read the same");
    free(crlf);

    usage_scan(&part, 1,
               "event: message_start\n"
               "data: {\"type\":\"message_start\",\"message\":{\"usage\":"
               "{\"input_tokens\":10,\"output_tokens\":1}}}\n\n"
               "event: content_block_delta\n"
               "data: {\"type\":\"content_block_delta\",\"delta\":"
               "{\"text\":\"Hel\"}}\n\n"
               "event: error\n"
               "data: {\"type\": \"error\", \"error\": {\"type\": "
               "\"overloaded_error\", \"message\": \"Overloaded\"}}\n\n", 7);
    check(part.error_event && part.input_tokens == 10
          && part.output_tokens == 1,
          "an error event mid-stream is flagged, usage so far is kept");

    usage_scan(&part, 1,
               "data: {\"usage\": {\"input_tokens\": 5, \"oops\n\n"
               "data: {\"usage\": {\"output_tokens\": 6}}\n\n", 4);
    check(part.input_tokens == 5 && part.output_tokens == 6,
          "a broken event does not spoil the next one");

    usage_scan(&part, 1,
               "data: {\"usage\":\n"
               "data:  {\"input_tokens\": 12}}\n\n", 2);
    check(part.input_tokens == 12, "an event's data may span lines");

    usage_scan(&part, 0,
               "{\"id\":\"msg_1\",\"type\":\"message\",\"content\":[{\"type\":"
               "\"tool_use\",\"input\":{\"usage\":{\"input_tokens\":999}}},"
               "{\"type\":\"text\",\"text\":\"usage: input_tokens 998\"}],"
               "\"usage\":{\"input_tokens\":2095,\"cache_creation_input_tokens"
               "\":0,\"cache_read_input_tokens\":0,\"output_tokens\":503}}", 9);
    check(part.input_tokens == 2095 && part.output_tokens == 503
          && part.seen == (RATEPOOL_USAGE_INPUT | RATEPOOL_USAGE_OUTPUT
                           | RATEPOOL_USAGE_CACHE_CREATION
                           | RATEPOOL_USAGE_CACHE_READ
                           | RATEPOOL_USAGE_FINAL),
          "a JSON body's usage is read, a usage object in content is not");

    usage_scan(&part, 1,
               "data: {\"id\":\"c1\",\"choices\":[{\"delta\":{\"content\":"
               "\"Hi\"}}],\"usage\":null}\n\n"
               "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens"
               "\":20,\"completion_tokens\":7,\"total_tokens\":27,"
               "\"prompt_tokens_details\":{\"cached_tokens\":8},"
               "\"completion_tokens_details\":{\"reasoning_tokens\":3}}}\n\n"
               "data: [DONE]\n\n", 6);
    check(part.input_tokens == 20 && part.output_tokens == 7
          && part.cached_tokens == 8 && part.events == 3,
          "OpenAI chat stream usage, with cached tokens and [DONE]");

    usage_scan(&part, 1,
               "event: response.completed\n"
               "data: {\"type\":\"response.completed\",\"response\":{\"usage\":"
               "{\"input_tokens\":30,\"input_tokens_details\":{\"cached_tokens"
               "\":10},\"output_tokens\":9,\"total_tokens\":39}}}\n\n", 11);
    check(part.input_tokens == 30 && part.output_tokens == 9
          && part.cached_tokens == 10,
          "OpenAI Responses usage in response.completed");

    usage_scan(&part, 0,
               "{\"usage\":{\"input_tokens\":-5,\"output_tokens\":1.5,"
               "\"cache_read_input_tokens\":1e3,\"cache_creation_input_tokens"
               "\":12345678901234567890123}}", 0);
    check(part.seen == 0, "negative, fractional and absurd counts are ignored");

    usage_scan(&part, 0, "{\"usage\":{\"output_tokens\":77", 0);
    check(part.output_tokens == 77, "a number at the very end is complete");

    usage_scan(&part, 0,
               "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["
               "[[[[[[[[[[[[[[[[[[[[{\"usage\":{\"input_tokens\":1}}", 0);
    check(part.seen == 0, "nesting past 64 levels is not followed");

    usage_scan(&part, 0, "{\"message\":{\"usage\":{\"input_tokens\":3}},"
                         "\"usage\":{\"output_tokens\":4}}", 1);
    check(part.input_tokens == 3 && part.output_tokens == 4,
          "message.usage and usage both count");

    usage_scan(&part, 0, "{\"a\":{\"usage\":{\"input_tokens\":3}}}", 1);
    check(part.seen == 0, "usage under any other key does not count");
}


static void
test_budget(void)
{
    time_t             t;
    ratepool_budget_t  b;

    /* 2026-11-23T17:40:00Z */
    t = 1795455600;

    check(ratepool_budget_reset(RATEPOOL_BUDGET_DAY, t) == 1795478400,
          "a daily budget resets at the next midnight UTC");
    check(ratepool_budget_reset(RATEPOOL_BUDGET_MONTH, t) == 1796083200,
          "a monthly budget resets on the first of the next month");
    check(ratepool_budget_reset(RATEPOOL_BUDGET_MONTH, 1798675200)
          == 1798761600, "on New Year's Eve, on January the first");
    check(ratepool_budget_reset(RATEPOOL_BUDGET_MONTH, 1709164800)
          == 1709251200, "on a leap day, on March the first");

    b.used = 0;
    b.period = 0;

    ratepool_budget_add(&b, RATEPOOL_BUDGET_DAY, t, 600);
    ratepool_budget_add(&b, RATEPOOL_BUDGET_DAY, t + 3600, 500);
    check(ratepool_budget_used(&b, RATEPOOL_BUDGET_DAY, t + 3600) == 1100,
          "usage adds up within a day");
    check(ratepool_budget_used(&b, RATEPOOL_BUDGET_DAY, 1795478400) == 0,
          "and counts nothing once the day is over");

    ratepool_budget_add(&b, RATEPOOL_BUDGET_DAY, 1795478400 + 1, 7);
    check(b.used == 7, "the new day starts from what it used");

    b.used = 0;
    b.period = 0;
    ratepool_budget_add(&b, RATEPOOL_BUDGET_MONTH, t, 10);
    ratepool_budget_add(&b, RATEPOOL_BUDGET_MONTH, 1796083200 - 1, 10);
    check(ratepool_budget_used(&b, RATEPOOL_BUDGET_MONTH, 1796083200 - 1)
          == 20, "a month's usage adds up to its last second");
    check(ratepool_budget_used(&b, RATEPOOL_BUDGET_MONTH, 1796083200) == 0,
          "and is over at midnight of the first");

    /* what the fleet counted, as Redis says: the larger count holds */
    b.used = 0;
    b.period = 0;
    ratepool_budget_add(&b, RATEPOOL_BUDGET_DAY, t, 100);
    ratepool_budget_raise(&b, RATEPOOL_BUDGET_DAY, t, 250);
    check(ratepool_budget_used(&b, RATEPOOL_BUDGET_DAY, t) == 250,
          "a fleet's larger count of the day is taken");
    ratepool_budget_raise(&b, RATEPOOL_BUDGET_DAY, t, 50);
    check(ratepool_budget_used(&b, RATEPOOL_BUDGET_DAY, t) == 250,
          "a smaller one is not");
    ratepool_budget_raise(&b, RATEPOOL_BUDGET_DAY, 1795478400 + 5, 7);
    check(ratepool_budget_used(&b, RATEPOOL_BUDGET_DAY, 1795478400 + 5) == 7,
          "and a new day's count replaces the old day's");
}


static int
decimal(const char *s, unsigned decimals, uint64_t max, uint64_t *v)
{
    return ratepool_decimal_parse((const unsigned char *) s, strlen(s),
                                  decimals, max, v);
}


static void
test_price(void)
{
    uint64_t          v;
    ratepool_price_t  sonnet;

    check(decimal("3", 3, RATEPOOL_PRICE_MAX, &v) && v == 3000,
          "$3 a million tokens is 3000 nano-dollars a token");
    check(decimal("3.75", 3, RATEPOOL_PRICE_MAX, &v) && v == 3750,
          "a price with cents");
    check(decimal("0.3", 3, RATEPOOL_PRICE_MAX, &v) && v == 300,
          "a price under a dollar");
    check(decimal("0.075", 3, RATEPOOL_PRICE_MAX, &v) && v == 75,
          "a price of a tenth of a cent");
    check(!decimal("0.0755", 3, RATEPOOL_PRICE_MAX, &v),
          "finer than a thousandth is refused, not rounded");
    check(!decimal("1000.001", 3, RATEPOOL_PRICE_MAX, &v),
          "as is a price over the most");
    check(!decimal("", 3, 100, &v) && !decimal(".", 3, 100, &v)
          && !decimal("3.", 3, 100, &v) && !decimal("1.2.3", 3, 100, &v)
          && !decimal("-1", 3, 100, &v) && !decimal("1e3", 3, 100, &v),
          "and what is not a plain decimal");
    check(!decimal("99999999999999999999999", 0, UINT64_MAX / 10, &v),
          "a number too large for 64 bits");
    check(decimal("50.5", 9, 1000000000ULL * RATEPOOL_NANO_PER_USD, &v)
          && v == 50500000000ULL, "a budget of $50.50 in nano-dollars");

    sonnet.input = 3000;
    sonnet.output = 15000;
    sonnet.cache_write = 3750;
    sonnet.cache_read = 300;

    check(ratepool_price_cost(&sonnet, 1000000, 0, 0, 0)
          == 3ULL * RATEPOOL_NANO_PER_USD, "a million input tokens: $3");
    check(ratepool_price_cost(&sonnet, 100, 200, 1000, 10000)
          == 100 * 3000 + 200 * 15000 + 1000 * 3750 + 10000 * 300,
          "each kind at its price");
    check(ratepool_price_cost(&sonnet, RATEPOOL_USAGE_TOKENS_MAX,
                              RATEPOOL_USAGE_TOKENS_MAX,
                              RATEPOOL_USAGE_TOKENS_MAX,
                              RATEPOOL_USAGE_TOKENS_MAX)
          == 100000000ULL * (3000 + 15000 + 3750 + 300),
          "the largest usage there can be does not overflow");
}

/* feeds a body whole, then split at every byte, and checks both agree */

static int
request_scan(const char *body, ratepool_request_t *whole)
{
    size_t              i, len;
    ratepool_request_t  split;

    len = strlen(body);

    ratepool_request_init(whole);
    ratepool_request_feed(whole, (const unsigned char *) body, len);

    for (i = 1; i < len; i++) {
        ratepool_request_init(&split);
        ratepool_request_feed(&split, (const unsigned char *) body, i);
        ratepool_request_feed(&split, (const unsigned char *) body + i,
                              len - i);

        if (split.model_len != whole->model_len
            || memcmp(split.model, whole->model, whole->model_len) != 0
            || split.has_max_tokens != whole->has_max_tokens
            || split.max_tokens != whole->max_tokens
            || split.stream != whole->stream
            || split.options_at != whole->options_at
            || split.options_null != whole->options_null
            || split.options_object != whole->options_object
            || split.options_members != whole->options_members
            || split.usage_at != whole->usage_at
            || split.usage_value != whole->usage_value
            || split.model_at != whole->model_at
            || split.model_end != whole->model_end
            || ratepool_request_whole(&split) != ratepool_request_whole(whole))
        {
            return 0;
        }
    }

    return 1;
}


static void
test_request(void)
{
    ratepool_request_t  rq;

    check(request_scan("{\"model\":\"claude-opus-4-6\",\"max_tokens\":1024,"
                       "\"messages\":[{\"role\":\"user\",\"content\":"
                       "\"hi\"}],\"stream\":true}", &rq),
          "a body reads the same split at any byte");
    check(rq.model_len == 15 && memcmp(rq.model, "claude-opus-4-6", 15) == 0,
          "the model is read");
    check(rq.model_at == 9 && rq.model_end == 26,
          "and where its value is, quotes included");
    check(rq.has_max_tokens && rq.max_tokens == 1024,
          "max_tokens is read");
    check(rq.stream, "stream: true is read");

    check(request_scan("{\"max_tokens\": 2048, \"messages\": [{\"role\": "
                       "\"user\", \"content\": \"{\\\"model\\\": \\\"x\\\", "
                       "\\\"max_tokens\\\": 9}\"}, {\"model\":\"fake\","
                       "\"max_tokens\":1}], \"model\" : \"claude-sonnet-4-5\""
                       " }", &rq)
          && rq.model_len == 17 && rq.max_tokens == 2048 && !rq.stream,
          "keys inside messages, even in escaped text, never match");

    check(request_scan("{\"model\":\"gpt-4o\",\"max_completion_tokens\":300,"
                       "\"stream\":false,\"stream_options\":{\"include_usage"
                       "\":true}}", &rq)
          && rq.max_tokens == 300 && !rq.stream,
          "OpenAI's max_completion_tokens is the output cap");

    check(request_scan("{\"model\":\"a\\u0062c\",\"max_tokens\":1.5}", &rq)
          && rq.model_len == 0 && !rq.has_max_tokens,
          "an escaped model name or a fraction is not taken");

    check(request_scan("{\"model\":12,\"max_tokens\":-3}", &rq)
          && rq.model_len == 0 && !rq.has_max_tokens,
          "a model that is no string, a negative cap: neither is taken");

    check(request_scan("[{\"model\":\"claude-opus-4-6\"}]", &rq)
          && rq.model_len == 0, "a body that is no object has no model");

    check(request_scan("{\"max_tokens\":99999999999999999999999}", &rq)
          && !rq.has_max_tokens, "an absurd max_tokens is not taken");

    {
        int                 n;
        ratepool_member_t   m[8];
        const char         *b = "{ \"model\" : \"x,}\" , \"messages\":[{\"a\":"
                                "\"}\"},2], \"stream\":true }";

        n = ratepool_json_members((const unsigned char *) b, strlen(b), m,
                                  8);
        check(n == 3 && m[0].start == 2 && m[0].end == 17
              && m[0].key_len == 5 && memcmp(b + m[1].start,
                                             "\"messages\":[{\"a\":\"}\"},2]",
                                             m[1].end - m[1].start) == 0
              && memcmp(b + m[2].start, "\"stream\":true",
                        m[2].end - m[2].start) == 0,
              "a body's own members, whole, strings and nesting skipped");
        check(ratepool_json_members((const unsigned char *) b, strlen(b), m,
                                    2) == -1
              && ratepool_json_members(S("[1]"), m, 8) == -1
              && ratepool_json_members(S("{\"a\":1"), m, 8) == -1,
              "too many, or no object, or one cut short: none");
    }

    check(ratepool_model_match(S("claude-opus-*"), S("claude-opus-4-6")),
          "a pattern matches a model name");
    check(!ratepool_model_match(S("claude-opus-*"), S("claude-sonnet-4-5")),
          "and not another class");
    check(ratepool_model_match(S("*haiku*"), S("claude-3-5-haiku-latest"))
          && ratepool_model_match(S("gpt-4o"), S("gpt-4o"))
          && !ratepool_model_match(S("gpt-4o"), S("gpt-4o-mini"))
          && ratepool_model_match(S("*"), S(""))
          && ratepool_model_match(S("a*b*c"), S("aXbYbZc"))
          && !ratepool_model_match(S("a*b*c"), S("aXbYbZ")),
          "stars match any run, anywhere, and the rest matches exactly");

    check(ratepool_estimate_input(4000, RATEPOOL_RATE_DEFAULT) == 1000,
          "the first estimate is four bytes a token");
    check(ratepool_estimate_input(0, RATEPOOL_RATE_DEFAULT) == 1,
          "an empty body still counts a token");
    check(ratepool_estimate_learn(RATEPOOL_RATE_DEFAULT, 100, 1)
          == RATEPOOL_RATE_DEFAULT, "a tiny body teaches nothing");

    {
        int       i;
        uint32_t  rate;

        rate = RATEPOOL_RATE_DEFAULT;

        for (i = 0; i < 80; i++) {
            /* 400 KiB bodies of which 2,000 tokens count: mostly cached */
            rate = ratepool_estimate_learn(rate, 409600, 2000);
        }

        check(ratepool_estimate_input(409600, rate) >= 2000
              && ratepool_estimate_input(409600, rate) < 2100,
              "the rate settles on what requests really count");

        check(ratepool_estimate_learn(rate, 409600, 500000)
              <= ((uint64_t) rate * 7 + RATEPOOL_RATE_MAX) / 8 + 1,
              "one request moves the rate by an eighth at most");
    }

    {
        ratepool_usage_t  u;

        memset(&u, 0, sizeof(u));
        u.input_tokens = 999999999999999999ULL;
        u.output_tokens = 12;

        check(ratepool_usage_clamp(&u)
              && u.input_tokens == RATEPOOL_USAGE_TOKENS_MAX
              && u.output_tokens == 12,
              "an 18-digit token count is counted as 100 million");
        check(!ratepool_usage_clamp(&u), "and sane ones as they are");
    }

    test_usage_estimate();

    {
        ratepool_budget_t  b;

        memset(&b, 0, sizeof(b));
        ratepool_budget_add(&b, RATEPOOL_BUDGET_DAY, 86400 * 100,
                            UINT64_MAX - 5);
        ratepool_budget_add(&b, RATEPOOL_BUDGET_DAY, 86400 * 100, 10);
        check(b.used == UINT64_MAX, "a budget's count saturates, never wraps");
    }

    check(ratepool_estimate_output(0, 4096) == 4096,
          "output is reserved up to its cap while nothing is known");

    {
        int       i;
        uint64_t  avg;

        avg = 0;

        for (i = 0; i < 40; i++) {
            avg = ratepool_estimate_output_learn(avg, 1024);
        }

        check(avg == 1024, "the average settles on what answers produce");
        check(ratepool_estimate_output(avg, 4096) == 1024 + 256 + 16,
              "a quarter more is reserved, and a little");
        check(ratepool_estimate_output(avg, 100) == 100,
              "never more than the request's own cap");
        check(ratepool_estimate_output_learn(avg, 0) == 1024 - 128
              && ratepool_estimate_output_learn(avg, 9024) == 1024 + 1000,
              "one answer moves it by an eighth");
        check(ratepool_estimate_output_learn(0, 0) == 1
              && ratepool_estimate_output(1, 4096) == 17,
              "an answer with no output still counts as known");
        check(ratepool_estimate_output(ratepool_estimate_output_learn(avg,
                                           UINT64_MAX), UINT64_MAX)
              < (1ULL << 41), "absurd numbers stay bounded");
    }
}

/*
 * Conversation bodies are written with ' for " to stay readable.  Each
 * is read whole, byte by byte, split in two at every byte and in three
 * at a sample of pairs of bytes, and must read the same every way.
 */

static char  conv_body[4096];


static int
conv_same(const ratepool_request_t *a, const ratepool_request_t *b)
{
    return a->conv.valid == b->conv.valid
           && a->conv.prefix_hash == b->conv.prefix_hash
           && a->conv.conversation_hash == b->conv.conversation_hash
           && a->conv.has_prefix == b->conv.has_prefix
           && a->conv.prefix_bytes == b->conv.prefix_bytes
           && a->conv.cache_control == b->conv.cache_control
           && a->conv.ttl_1h == b->conv.ttl_1h
           && a->conv.last_message_at == b->conv.last_message_at
           && a->model_len == b->model_len
           && memcmp(a->model, b->model, a->model_len) == 0
           && a->has_max_tokens == b->has_max_tokens
           && a->max_tokens == b->max_tokens
           && a->stream == b->stream
           && ratepool_request_whole(a) == ratepool_request_whole(b);
}


static int
conv_scan(const char *src, ratepool_request_t *whole)
{
    size_t               i, j, len;
    const unsigned char  *p;
    ratepool_request_t   split;

    for (len = 0; src[len] && len < sizeof(conv_body) - 1; len++) {
        conv_body[len] = (src[len] == '\'') ? '"' : src[len];
    }

    conv_body[len] = '\0';
    p = (const unsigned char *) conv_body;

    ratepool_request_init(whole);
    ratepool_request_feed(whole, p, len);

    ratepool_request_init(&split);

    for (i = 0; i < len; i++) {
        ratepool_request_feed(&split, p + i, 1);
    }

    if (!conv_same(whole, &split)) {
        return 0;
    }

    for (i = 1; i < len; i++) {
        ratepool_request_init(&split);
        ratepool_request_feed(&split, p, i);
        ratepool_request_feed(&split, p + i, len - i);

        if (!conv_same(whole, &split)) {
            return 0;
        }
    }

    for (i = 1; i < len; i += 5) {
        for (j = i + 1; j < len; j += 3) {
            ratepool_request_init(&split);
            ratepool_request_feed(&split, p, i);
            ratepool_request_feed(&split, p + i, j - i);
            ratepool_request_feed(&split, p + j, len - j);

            if (!conv_same(whole, &split)) {
                return 0;
            }
        }
    }

    return 1;
}


#define CONV_TOOLS                                                           \
    "'tools':[{'name':'read','description':'Reads a {file}',"                \
    "'input_schema':{'type':'object','properties':{'path':"                  \
    "{'type':'string'}}}}]"

#define CONV_SYSTEM                                                          \
    "'system':[{'type':'text','text':'You are Claude Code.'},"               \
    "{'type':'text','text':'Be brief.',"                                     \
    "'cache_control':{'type':'ephemeral'}}]"

#define CONV_FIRST                                                           \
    "{'role':'user','content':[{'type':'text','text':'fix the bug'}]}"

#define CONV_FIRST_CC                                                        \
    "{'role':'user','content':[{'type':'text','text':'fix the bug',"         \
    "'cache_control':{'type':'ephemeral'}}]}"


static void
test_conversation(void)
{
    ratepool_request_t  a, b;

    check(conv_scan("{'model':'claude-opus-4-6','max_tokens':1024,"
                    CONV_TOOLS "," CONV_SYSTEM ",'messages':["
                    CONV_FIRST_CC "],'stream':true}", &a),
          "a conversation reads the same split anywhere");
    check(a.conv.valid && a.conv.prefix_hash && a.conv.conversation_hash
          && a.conv.prefix_hash != a.conv.conversation_hash
          && a.conv.has_prefix,
          "an Anthropic body has a prefix and a conversation hash");
    check(a.conv.cache_control && !a.conv.ttl_1h,
          "its cache_control breakpoints are seen");
    check(a.conv.prefix_bytes == sizeof(CONV_TOOLS "," CONV_SYSTEM)
                                 - sizeof("'tools':,'system':"),
          "the bytes of its tools' and system's values are counted");
    check(a.model_len == 15 && memcmp(a.model, "claude-opus-4-6", 15) == 0
          && a.has_max_tokens && a.max_tokens == 1024 && a.stream
          && ratepool_request_whole(&a),
          "and its model, max_tokens and stream are read as before");

    check(conv_scan("{'messages':[" CONV_FIRST_CC "]," CONV_SYSTEM
                    ",'stream':true,'max_tokens':1024," CONV_TOOLS
                    ",'model':'claude-opus-4-6'}", &b)
          && a.conv.prefix_hash == b.conv.prefix_hash
          && a.conv.conversation_hash == b.conv.conversation_hash,
          "the order of the top-level keys does not matter");

    check(conv_scan("{'model':'claude-opus-4-6','max_tokens':1024,"
                    CONV_TOOLS "," CONV_SYSTEM ",'messages':["
                    CONV_FIRST ",{'role':'assistant','content':[{'type':"
                    "'text','text':'done'}]},{'role':'user','content':"
                    "[{'type':'text','text':'thanks','cache_control':"
                    "{'type':'ephemeral'}}]}],'stream':true}", &b)
          && b.conv.valid
          && b.conv.prefix_hash == a.conv.prefix_hash
          && b.conv.conversation_hash == a.conv.conversation_hash,
          "turn 2, its breakpoint moved to the last user block, is the "
          "same conversation");

    check(conv_scan("{'model':'claude-opus-4-6','max_tokens':1024,"
                    CONV_TOOLS "," CONV_SYSTEM ",'messages':["
                    CONV_FIRST "],'stream':true}", &b)
          && b.conv.conversation_hash == a.conv.conversation_hash,
          "a first message with or without its cache_control is the same");

    check(conv_scan("{'model':'claude-opus-4-6','max_tokens':1024,"
                    CONV_TOOLS "," CONV_SYSTEM ",'messages':["
                    CONV_FIRST_CC ",{'role':'assistant','content':'ok'},"
                    "{'role':'user','content':'go on'}]}", &b)
          && b.conv.conversation_hash == a.conv.conversation_hash
          && b.conv.last_message_at == (uint64_t) (strstr(conv_body,
                                       "{\"role\":\"user\",\"content\":\"go")
                                       - conv_body),
          "more turns appended are the same conversation, and the last "
          "message's offset is known");

    check(conv_scan("{'model':'claude-opus-4-6','max_tokens':1024,"
                    CONV_TOOLS "," CONV_SYSTEM ",'messages':[{'role':"
                    "'user','content':[{'type':'text','text':'fix a bug'}]}"
                    "],'stream':true}", &b)
          && b.conv.valid
          && b.conv.prefix_hash == a.conv.prefix_hash
          && b.conv.conversation_hash != a.conv.conversation_hash,
          "another first message: another conversation, the same prefix");

    check(conv_scan("{'model':'claude-opus-4-6','max_tokens':1024,"
                    CONV_TOOLS ",'system':[{'type':'text','text':'You are "
                    "Claude Code!'},{'type':'text','text':'Be brief.',"
                    "'cache_control':{'type':'ephemeral'}}],'messages':["
                    CONV_FIRST_CC "],'stream':true}", &b)
          && b.conv.valid
          && b.conv.prefix_hash != a.conv.prefix_hash
          && b.conv.conversation_hash != a.conv.conversation_hash,
          "another system prompt: another prefix and conversation");

    check(conv_scan("{'model':'claude-opus-4-6','max_tokens':1024,"
                    "'tools':[]," CONV_SYSTEM ",'messages':["
                    CONV_FIRST_CC "],'stream':true}", &b)
          && b.conv.valid
          && b.conv.prefix_hash != a.conv.prefix_hash
          && b.conv.conversation_hash != a.conv.conversation_hash,
          "other tools: another prefix and conversation");

    check(conv_scan("{'tools':[{'name':'x'}],'messages':[{'role':'user',"
                    "'content':'hi'}]}", &a)
          && conv_scan("{'system':[{'name':'x'}],'messages':[{'role':"
                       "'user','content':'hi'}]}", &b)
          && a.conv.valid && b.conv.valid
          && a.conv.prefix_hash != b.conv.prefix_hash,
          "the same value as tools or as system is not the same prefix");

    check(conv_scan("\n{\n  'model': 'claude-opus-4-6',\n  'max_tokens': "
                    "1024,\n  'tools': [\n    {\n      'name': 'read',\n"
                    "      'description': 'Reads a {file}',\n      "
                    "'input_schema': {\n        'type': 'object',\n"
                    "        'properties': {\n          'path': { 'type' : "
                    "'string' }\n        }\n      }\n    }\n  ],\r\n  "
                    "'system': [ { 'type': 'text', 'text': 'You are Claude"
                    " Code.' }, {\t'type': 'text', 'text': 'Be brief.' } ]"
                    ",\n  'messages': [\n    { 'role': 'user', 'content': "
                    "[ { 'type': 'text', 'text': 'fix the bug' } ] }\n  ],"
                    "\n  'stream': true\n}\n", &b), "a pretty-printed body "
          "reads the same split anywhere");
    conv_scan("{'model':'claude-opus-4-6','max_tokens':1024," CONV_TOOLS
              "," CONV_SYSTEM ",'messages':[" CONV_FIRST_CC "]}", &a);
    check(b.conv.valid && b.conv.prefix_hash == a.conv.prefix_hash
          && b.conv.conversation_hash == a.conv.conversation_hash,
          "spacing between tokens does not change the hashes");

    conv_scan("{'messages':[{'role':'user','content':'fix the  bug'}]}", &a);
    conv_scan("{'messages':[{'role':'user','content':'fix the bug'}]}", &b);
    check(a.conv.valid && b.conv.valid
          && a.conv.conversation_hash != b.conv.conversation_hash,
          "spacing inside a string does");

    conv_scan("{'messages':[{'role':'user','content':'h\\u0069'}]}", &a);
    conv_scan("{'messages':[{'role':'user','content':'hi'}]}", &b);
    check(a.conv.valid && a.conv.conversation_hash != b.conv.conversation_hash
          && !b.conv.has_prefix, "strings are hashed as written, escapes "
          "too, and no tools or system is no prefix");

    conv_scan("{'messages':[{'role':'user','content':[10,true]}]}", &a);
    conv_scan("{'messages':[{'role':'user','content':[11,true]}]}", &b);
    check(a.conv.valid && b.conv.valid
          && a.conv.conversation_hash != b.conv.conversation_hash,
          "numbers are hashed");

    conv_scan("{'messages':[{'role':'user','content':[10,false]}]}", &b);
    check(b.conv.valid && a.conv.conversation_hash != b.conv.conversation_hash,
          "and literals");

    conv_scan("{'messages':[{'role':'user','content':[1,2]}]}", &a);
    conv_scan("{'messages':[{'role':'user','content':[12]}]}", &b);
    check(a.conv.valid && b.conv.valid
          && a.conv.conversation_hash != b.conv.conversation_hash,
          "array elements stay apart");

    conv_scan("{'messages':[{'role':'user','content':'x','abcdefghijklmnop"
              "q':1}]}", &a);
    conv_scan("{'messages':[{'role':'user','content':'x','Abcdefghijklmnop"
              "q':1}]}", &b);
    check(a.conv.valid && b.conv.valid
          && a.conv.conversation_hash != b.conv.conversation_hash,
          "a key longer than what is held back is hashed in full");

    conv_scan("{'messages':[{'role':'user','content':'x','abcdefghijklmnop"
              "qrstuvwxyz1':1}]}", &a);
    conv_scan("{'messages':[{'role':'user','content':'x','abcdefghijklmnop"
              "qrstuvwxyz2':1}]}", &b);
    check(a.conv.valid && b.conv.valid
          && a.conv.conversation_hash != b.conv.conversation_hash,
          "so is a much longer one");

    conv_scan("{'messages':[{'role':'user','content':'x','cache_controls':"
              "1}]}", &a);
    conv_scan("{'messages':[{'role':'user','content':'x'}]}", &b);
    check(a.conv.valid && a.conv.conversation_hash != b.conv.conversation_hash
          && !a.conv.cache_control,
          "only cache_control itself is left out");
}


static void
test_conversation_openai(void)
{
    ratepool_request_t  a, b;

    check(conv_scan("{'model':'gpt-4o','messages':[{'role':'system',"
                    "'content':'You are terse.'},{'role':'user','content':"
                    "'hello'},{'role':'assistant','content':'hi'},{'role':"
                    "'user','content':'more'}],'max_completion_tokens':300}",
                    &a)
          && a.conv.valid && a.conv.has_prefix
          && a.model_len == 6 && a.max_tokens == 300,
          "an OpenAI body has hashes, its model and cap read as before");

    check(conv_scan("{'messages':[{'content':'You are terse.','role':"
                    "'system'},{'role':'user','content':'hello'}],'model':"
                    "'gpt-4o'}", &b)
          && b.conv.valid && b.conv.prefix_hash != a.conv.prefix_hash,
          "a message is hashed as written, its keys in their order");

    check(conv_scan("{'model':'gpt-4o','messages':[{'role':'system',"
                    "'content':'You are terse.'},{'role':'user','content':"
                    "'hello'}]}", &b)
          && b.conv.prefix_hash == a.conv.prefix_hash
          && b.conv.conversation_hash == a.conv.conversation_hash,
          "OpenAI: turn 1 and turn 2 are one conversation");

    check(conv_scan("{'model':'gpt-4o','messages':[{'role':'system',"
                    "'content':'You are terse.'},{'role':'user','content':"
                    "'goodbye'}]}", &b)
          && b.conv.prefix_hash == a.conv.prefix_hash
          && b.conv.conversation_hash != a.conv.conversation_hash,
          "OpenAI: another first user message, the same prefix");

    check(conv_scan("{'model':'gpt-4o','messages':[{'role':'system',"
                    "'content':'You are terse.'},{'role':'developer',"
                    "'content':'Use JSON.'},{'role':'user','content':"
                    "'hello'}]}", &b)
          && b.conv.valid && b.conv.prefix_hash != a.conv.prefix_hash,
          "OpenAI: each leading system or developer message is prefix");

    check(conv_scan("{'model':'gpt-4o','messages':[{'role':'system',"
                    "'content':'You are terse.'},{'role':'assistant',"
                    "'content':'Hi, how can I help?'},{'role':'user',"
                    "'content':'hello'},{'role':'system','content':'late'}"
                    "]}", &b)
          && b.conv.valid && b.conv.prefix_hash == a.conv.prefix_hash
          && b.conv.conversation_hash == a.conv.conversation_hash,
          "OpenAI: the first user message counts, after a greeting too, "
          "and a later system message is no prefix");

    check(conv_scan("{'model':'gpt-4o','messages':[{'role':'user',"
                    "'content':'hello'}]}", &b)
          && b.conv.valid && !b.conv.has_prefix
          && b.conv.prefix_hash != a.conv.prefix_hash,
          "OpenAI: no system message, no prefix");

    check(conv_scan("{'model':'gpt-4o','tools':null,'messages':[{'role':"
                    "'user','content':'hello'}]}", &a)
          && a.conv.valid && a.conv.conversation_hash
                             == b.conv.conversation_hash,
          "tools: null is no tools");

    check(conv_scan("{'messages':[{'role':'assistant','content':[{'type':"
                    "'text','role':'user','text':'x'}]},{'role':'user',"
                    "'content':'hello'}]}", &a)
          && a.conv.valid && a.conv.conversation_hash
                             == b.conv.conversation_hash,
          "only a message's own role counts, not one inside its content");

    check(conv_scan("{'messages':[{'role':'us\\u0065r','content':'x'}]}",
                    &a) && !a.conv.valid,
          "a role is compared as written");
}


static void
test_conversation_bad(void)
{
    size_t              i, len;
    ratepool_request_t  a, b;

    conv_scan("{'model':'m'," CONV_SYSTEM ",'messages':[" CONV_FIRST
              ",{'role':'assistant','content':'x'}]}", &a);
    len = strlen(conv_body);

    for (i = 0; i < len; i++) {
        ratepool_request_init(&b);
        ratepool_request_feed(&b, (const unsigned char *) conv_body, i);

        if (b.conv.valid || b.conv.prefix_hash || b.conv.conversation_hash) {
            break;
        }
    }

    check(a.conv.valid && i == len, "a body cut short anywhere has no hashes");

    check(conv_scan("{'model':'m'," CONV_SYSTEM ",'max_tokens':5}", &a)
          && !a.conv.valid && !a.conv.prefix_hash
          && !a.conv.conversation_hash && a.conv.cache_control
          && a.max_tokens == 5,
          "no messages, no hashes");

    check(conv_scan("{'model':'m','messages':[]}", &a) && !a.conv.valid
          && conv_scan("{'messages':[{'role':'assistant','content':'x'}]}",
                       &b) && !b.conv.valid,
          "no user message, no hashes");

    check(conv_scan("{'messages':'hello','model':'m'}", &a) && !a.conv.valid
          && a.model_len == 1,
          "messages that are no array: no hashes, the model is read");

    check(conv_scan("{'messages':[{'role':'user','content':[1 2]}],"
                    "'model':'m','max_tokens':7}", &a)
          && !a.conv.valid && a.model_len == 1 && a.max_tokens == 7
          && ratepool_request_whole(&a),
          "a malformed message: no hashes, the rest is read as before");

    check(conv_scan("{'messages':[{'role':'user','content':[}]],"
                    "'model':'m','max_tokens':7}", &a)
          && !a.conv.valid && a.model_len == 1 && a.max_tokens == 7,
          "mismatched brackets: no hashes, the rest is read as before");

    check(conv_scan("{'messages':[{'role':'user','content':'x'},{'role':"
                    "'assistant','content':[1 2]}],'model':'m'}", &a)
          && !a.conv.valid && a.model_len == 1,
          "a malformed message after the first: no hashes either");

    check(conv_scan("{'messages':[{'role':'user','content':'x'},{'role':"
                    "'assistant','content':[1}]],'model':'m'}", &a)
          && !a.conv.valid && a.model_len == 1
          && ratepool_request_whole(&a),
          "nor an array closed as an object, where it ends as before");

    check(conv_scan("{'messages':{'a':{'role':'user','content':'x'}}}", &a)
          && !a.conv.valid, "messages that are an object: no hashes");

    check(conv_scan("{" CONV_SYSTEM "," CONV_SYSTEM ",'messages':["
                    CONV_FIRST "]}", &a) && !a.conv.valid,
          "a repeated system: no hashes");

    check(conv_scan("{'system':true,'messages':[" CONV_FIRST "]}", &a)
          && !a.conv.valid, "a system that is true: no hashes");

    check(conv_scan("{'messages':[" CONV_FIRST "]} x", &a) && a.conv.valid,
          "what follows the body is not read");

    check(conv_scan("[{'messages':[" CONV_FIRST "]}]", &a) && !a.conv.valid,
          "a body that is no object has no hashes");
}


static void
test_conversation_deep(void)
{
    char                src[2048], *p;
    unsigned            i;
    ratepool_request_t  a;

    p = src;
    p += sprintf(p, "{'messages':[{'role':'user','content':");

    for (i = 0; i < RATEPOOL_CONV_DEPTH - 2; i++) {
        *p++ = '[';
    }

    for (i = 0; i < RATEPOOL_CONV_DEPTH - 2; i++) {
        *p++ = ']';
    }

    sprintf(p, "}],'model':'m'}");

    check(conv_scan(src, &a) && a.conv.valid && a.model_len == 1,
          "nesting up to the limit is hashed");

    p = src;
    p += sprintf(p, "{'messages':[{'role':'user','content':");

    for (i = 0; i < RATEPOOL_CONV_DEPTH - 1; i++) {
        *p++ = '[';
    }

    for (i = 0; i < RATEPOOL_CONV_DEPTH - 1; i++) {
        *p++ = ']';
    }

    sprintf(p, "}],'model':'m'}");

    check(conv_scan(src, &a) && !a.conv.valid && a.model_len == 1
          && ratepool_request_whole(&a),
          "one level deeper is not, and the rest is read as before");

    p = src;
    p += sprintf(p, "{'tools':");

    for (i = 0; i < 300; i++) {
        *p++ = '{';
        *p++ = '\'';
        *p++ = 'a';
        *p++ = '\'';
        *p++ = ':';
    }

    sprintf(p, "1}}}],'model':'m'}");

    check(conv_scan(src, &a) && !a.conv.valid && !ratepool_request_whole(&a),
          "a deep body cut short: no hashes, no crash");
}


static void
test_conversation_text(void)
{
    ratepool_request_t  a, b;

    check(conv_scan("{'messages':[{'role':'user','content':[{'type':'text',"
                    "'text':'say \\'cache_control\\': {\\'ttl\\':\\'1h\\'}"
                    " ]}[{ \\\\'}]}],'model':'m','max_tokens':3}", &a)
          && a.conv.valid && !a.conv.cache_control && !a.conv.ttl_1h
          && a.model_len == 1 && a.max_tokens == 3,
          "cache_control, quotes, brackets and escapes in text are text");

    check(conv_scan("{'messages':[{'role':'user','content':'cache_control'}"
                    "]}", &a)
          && conv_scan("{'messages':[{'role':'user','content':'other'}]}",
                       &b)
          && a.conv.valid && !a.conv.cache_control
          && a.conv.conversation_hash != b.conv.conversation_hash,
          "a string cache_control is hashed like any other");

    check(conv_scan("{'messages':[{'role':'user','content':[{'type':'text',"
                    "'text':'x','cache_control':{'type':'ephemeral','ttl':"
                    "'1h'}}]}]}", &a)
          && a.conv.cache_control && a.conv.ttl_1h,
          "a one-hour breakpoint is seen");

    check(conv_scan("{'cache_control':{'type':'ephemeral','ttl':'1h'},"
                    "'messages':[{'role':'user','content':'x'}]}", &a)
          && conv_scan("{'messages':[{'role':'user','content':'x'}]}", &b)
          && a.conv.cache_control && a.conv.ttl_1h
          && a.conv.conversation_hash == b.conv.conversation_hash,
          "the top-level automatic breakpoint is seen, and not hashed");

    check(conv_scan("{'tools':[{'name':'t','input_schema':{'ttl':'1h'}}],"
                    "'messages':[{'role':'user','content':'x'}]}", &a)
          && a.conv.valid && !a.conv.cache_control && !a.conv.ttl_1h,
          "a ttl outside a cache_control is no breakpoint");

    check(conv_scan("{'messages':[{'role':'user','content':[{'type':'text',"
                    "'text':'x','cache_control':{'type':'ephemeral','x':{"
                    "'ttl':'1h'}}}]}]}", &a)
          && a.conv.valid && a.conv.cache_control && !a.conv.ttl_1h,
          "nor one deeper inside it");

    check(conv_scan("{'messages':[{'role':'user','content':[{'type':'text',"
                    "'text':'x','cache_control':{'type':'ephemeral'}},"
                    "{'cache_control':{'type':'ephemeral'},'type':'text',"
                    "'text':'y'}]}]}", &a)
          && conv_scan("{'messages':[{'role':'user','content':[{'type':"
                       "'text','text':'x'},{'type':'text','text':'y'}]}]}",
                       &b)
          && a.conv.valid
          && a.conv.conversation_hash == b.conv.conversation_hash,
          "cache_control first or last in a block leaves no trace");

    check(conv_scan("{'messages':[{'role':'user','content':[{'type':'text',"
                    "'text':'x','cache_control':{'type':'ephemeral'}}]}]}",
                    &a)
          && conv_scan("{'messages':[{'role':'user','content':[{'type':"
                       "'text','text':'x','cache_control':{'type':"
                       "'ephemeral','ttl':'5m'}}]}]}", &b)
          && a.conv.conversation_hash == b.conv.conversation_hash,
          "nor does a changed cache_control");

    check(conv_scan("{'messages':[{'role':'user','content':[{'type':'text',"
                    "'text':'x','c\\u0061che_control':{'type':'ephemeral'}}"
                    "]}]}", &a)
          && a.conv.valid && !a.conv.cache_control,
          "an escaped key is not read as cache_control");
}


static void
test_reserve(void)
{
    ratepool_bucket_t  b;

    ratepool_bucket_init(&b, 6000, 0);

    check(ratepool_bucket_fit_ms(&b, 6000, 1000, 0, 0) == 0,
          "a cost fits a full bucket");
    check(ratepool_bucket_fit_ms(&b, 6000, 1000, 5000, 0) == 0,
          "and fits beside reservations that leave room for it");
    check(ratepool_bucket_fit_ms(&b, 6000, 1000, 5500, 0) == 1000,
          "beside more, it waits: the limit does not grow");
    check(ratepool_bucket_free(&b, 6000, 5500, 0) == 500,
          "what is free is the level less what is reserved");

    check(ratepool_bucket_fit_ms(&b, 6000, 9000, 0, 0) == 0,
          "a cost above the limit is served from a full bucket");
    check(ratepool_bucket_fit_ms(&b, 6000, 9000, 1, 0) == 1000,
          "but alone: a second, then ask again");

    ratepool_bucket_debit(&b, 6000, 7000, 0);
    check(ratepool_bucket_fit_ms(&b, 6000, 1000, 0, 0) == 20000,
          "in debt, the wait is until the debt and the cost have refilled");
    check(ratepool_bucket_fit_ms(&b, 0, 1000000, 1000000, 0) == 0,
          "an unknown limit never waits");
}


static void
test_spent(void)
{
    check(ratepool_error_spent(429, S("{\"type\":\"error\",\"error\":{"
          "\"type\":\"rate_limit_error\",\"details\":{\"error_code\":"
          "\"enforced_spend_limit_reached\"}}}")),
          "Anthropic's spend cap is money spent");
    check(ratepool_error_spent(429, S("{\"error\":{\"type\":"
          "\"insufficient_quota\",\"code\":\"insufficient_quota\"}}")),
          "OpenAI's quota is money spent");
    check(ratepool_error_spent(400, S("You have reached your specified "
                                      "API usage limits.")),
          "a self-set limit's 400 is money spent");
    check(ratepool_error_spent(402, S("")),
          "a 402 is money spent, whatever its body");
    check(!ratepool_error_spent(429, S("{\"type\":\"error\",\"error\":{"
          "\"type\":\"rate_limit_error\",\"message\":\"This request "
          "would exceed the rate limit\"}}")),
          "an ordinary 429 is not");
    check(!ratepool_error_spent(200, S("insufficient_quota")),
          "a 200 never is, whatever it says");
    check(!ratepool_error_spent(529, S("enforced_spend_limit_reached")),
          "nor a 529");
    check(!ratepool_error_spent(429, S("enforced_spend_limit_reache")),
          "a marker cut short by the end of what arrived is not read");
}


static void
test_too_large(void)
{
    check(ratepool_error_too_large(429, S("{\"error\":{\"message\":"
          "\"Request too large for gpt-4o-mini in organization org-x on "
          "tokens per min (TPM): Limit 30000, Requested 34307.\","
          "\"type\":\"tokens\",\"code\":\"rate_limit_exceeded\"}}")),
          "OpenAI's request too large for its limit");
    check(!ratepool_error_too_large(429, S("{\"error\":{\"message\":"
          "\"Rate limit reached for gpt-4o-mini in organization org-x on "
          "tokens per min (TPM): Limit 200000, Used 195869, Requested "
          "4412.\",\"code\":\"rate_limit_exceeded\"}}")),
          "a limit reached is not");
    check(!ratepool_error_too_large(400, S("Request too large for")),
          "nor a 400");
}


static void
test_normalize(void)
{
    ratepool_usage_t  u;

    memset(&u, 0, sizeof(u));
    u.input_tokens = 500;
    u.cached_tokens = 200;
    u.seen = RATEPOOL_USAGE_INPUT | RATEPOOL_USAGE_CACHED;
    ratepool_usage_normalize(&u);
    check(u.input_tokens == 300 && u.cache_read_input_tokens == 200,
          "OpenAI's cached tokens leave its prompt tokens as cache reads");

    memset(&u, 0, sizeof(u));
    u.input_tokens = 10;
    u.cached_tokens = 50;
    u.seen = RATEPOOL_USAGE_INPUT | RATEPOOL_USAGE_CACHED;
    ratepool_usage_normalize(&u);
    check(u.input_tokens == 0 && u.cache_read_input_tokens == 10,
          "never more cached than prompt tokens");

    memset(&u, 0, sizeof(u));
    u.input_tokens = 10;
    u.cache_read_input_tokens = 7;
    u.seen = RATEPOOL_USAGE_INPUT | RATEPOOL_USAGE_CACHE_READ;
    ratepool_usage_normalize(&u);
    check(u.input_tokens == 10 && u.cache_read_input_tokens == 7,
          "Anthropic's usage is left as it is");
}


static void
test_fallback(void)
{
    uint64_t              soonest;
    ratepool_candidate_t  c[2];

    memset(c, 0, sizeof(c));
    c[0].usable = 1;
    c[0].fallback = 1;
    c[0].headroom_permille = 1000;
    c[1].usable = 1;
    c[1].fallback = 0;
    c[1].headroom_permille = 100;
    c[1].org_inflight = 5;

    check(ratepool_pick(c, 2, 1000, &soonest) == 1,
          "a preferred key wins over a fallback with more headroom");

    c[1].free_at_ms = 5000;
    check(ratepool_pick(c, 2, 1000, &soonest) == 0,
          "the fallback is used while the preferred key is not free");
}


static void
test_usage_chunk(void)
{
    ratepool_request_t  rq;

    check(ratepool_usage_only_event(S("data: {\"id\":\"c\",\"choices\":[],"
                                      "\"usage\":{\"prompt_tokens\":5}}\n\n")),
          "OpenAI's usage chunk is told apart");
    check(ratepool_usage_only_event(S("data: {\"choices\" : [ ],"
                                      " \"usage\" : {}}\n\n")),
          "with spaces too");
    check(!ratepool_usage_only_event(S("data: {\"choices\":[{\"delta\":{}}],"
                                       "\"usage\":null}\n\n")),
          "a chunk with choices and a null usage is not it");
    check(!ratepool_usage_only_event(S("data: {\"choices\":[],"
                                       "\"prompt_filter_results\":[]}\n\n")),
          "nor Azure's first chunk, which has no usage");

    ratepool_request_init(&rq);
    ratepool_request_feed(&rq, S("{\"stream\":true,\"stream_options\":"
                                 "{\"include_usage\":false},\"messages\":[]}"));
    check(rq.stream && rq.stream_options && ratepool_request_whole(&rq),
          "a client's own stream_options are seen");

    check(request_scan("{\"stream\":true,\"stream_options\":{\"include_usage"
                       "\":false},\"messages\":[]}", &rq)
          && rq.options_at == 32 && rq.usage_at == 49 && rq.usage_value == 'f'
          && rq.options_members == 1 && !rq.options_null
          && rq.options_object,
          "where stream_options and its include_usage: false are is read");

    check(request_scan("{\"stream_options\" : null ,\"stream\":true}", &rq)
          && rq.options_at == 20 && rq.options_null && rq.usage_at == -1
          && ratepool_request_whole(&rq),
          "a null stream_options is read");

    check(request_scan("{\"stream_options\":{ },\"stream\":true}", &rq)
          && rq.options_at == 18 && rq.options_members == 0
          && rq.usage_at == -1 && ratepool_request_whole(&rq),
          "an empty one");

    check(request_scan("{\"stream_options\":{\"x\":{\"include_usage\":true,"
                       "\"y\":[1,\"}\"]},\"inc\\u006cude_usage\":true,"
                       "\"include_usage\" :null , \"z\":-1.5e3}}", &rq)
          && rq.options_members == 4 && rq.usage_value == 'n'
          && rq.usage_at == 101 && ratepool_request_whole(&rq),
          "its own include_usage only, not one nested or escaped");

    check(request_scan("{\"stream_options\":{\"include_usage\":true,}}", &rq)
          && !ratepool_request_whole(&rq),
          "and an object that is no JSON is not whole");

    ratepool_request_init(&rq);
    ratepool_request_feed(&rq, S("{\"stream\":true,\"messages\":[{\"x\":"
                                 "\"stream_options\"}]"));
    check(!rq.stream_options && !ratepool_request_whole(&rq),
          "not inside messages, and a body cut short is not whole");
}


/*
 * AWS's own worked example of a signed request (Amazon S3's "GET Object"
 * in its SigV4 documentation): the canonical request, the string to
 * sign and the signing key must all be right for this signature.
 */

static void
test_sigv4(void)
{
    char                      date[RATEPOOL_SIGV4_DATE_LEN + 1],
                              sig[RATEPOOL_SIGV4_HEX_LEN + 1],
                              empty[RATEPOOL_SIGV4_HEX_LEN + 1], auth[512];
    size_t                    len;
    ratepool_sigv4_t          s;
    ratepool_sigv4_header_t   h[4];

    ratepool_sigv4_sha256_hex("", 0, empty);
    check(strcmp(empty, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934c"
                        "a495991b7852b855") == 0,
          "the SHA-256 of nothing");

    ratepool_sigv4_date(1369353600, date);
    check(strcmp(date, "20130524T000000Z") == 0, "an amz date");

    h[0].name = "host";
    h[0].value = "examplebucket.s3.amazonaws.com";
    h[1].name = "range";
    h[1].value = "bytes=0-9";
    h[2].name = "x-amz-content-sha256";
    h[2].value = empty;
    h[3].name = "x-amz-date";
    h[3].value = date;

    for (len = 0; len < 4; len++) {
        h[len].name_len = strlen(h[len].name);
        h[len].value_len = strlen(h[len].value);
    }

    memset(&s, 0, sizeof(s));
    s.method = "GET";
    s.path = "/test.txt";
    s.path_len = 9;
    s.query = "";
    s.headers = h;
    s.nheaders = 4;
    s.payload_hex = empty;
    s.date = date;
    s.region = "us-east-1";
    s.region_len = 9;
    s.service = "s3";
    s.secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
    s.secret_len = strlen(s.secret);

    check(ratepool_sigv4_sign(&s, sig) == 0
          && strcmp(sig, "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48d"
                         "d91039c6036bdb41") == 0,
          "AWS's example request signs as AWS says");

    len = ratepool_sigv4_authorization(&s, "AKIAIOSFODNN7EXAMPLE", 20, auth,
                                       sizeof(auth));
    check(len == strlen(auth)
          && strcmp(auth, "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/"
                          "20130524/us-east-1/s3/aws4_request, SignedHeaders"
                          "=host;range;x-amz-content-sha256;x-amz-date, "
                          "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f"
                          "0170aba48dd91039c6036bdb41") == 0,
          "and its Authorization header is AWS's");

    check(ratepool_sigv4_authorization(&s, "AKIAIOSFODNN7EXAMPLE", 20, auth,
                                       100) == 0,
          "a header that does not fit is not cut short");
}


/* one event-stream frame: string headers, then the payload */

static size_t
es_frame(unsigned char *out, const char *message_type, const char *type,
    const char *payload)
{
    size_t          n, h, len;
    uint32_t        crc;
    const char     *names[3], *values[3];
    unsigned char  *p;
    size_t          i;

    names[0] = ":message-type";
    values[0] = message_type;
    names[1] = strcmp(message_type, "event") == 0 ? ":event-type"
                                                  : ":exception-type";
    values[1] = type;
    names[2] = ":content-type";
    values[2] = "application/json";

    p = out + 12;

    for (i = 0; i < 3; i++) {
        *p++ = (unsigned char) strlen(names[i]);
        memcpy(p, names[i], strlen(names[i]));
        p += strlen(names[i]);
        *p++ = 7;
        *p++ = (unsigned char) (strlen(values[i]) >> 8);
        *p++ = (unsigned char) strlen(values[i]);
        memcpy(p, values[i], strlen(values[i]));
        p += strlen(values[i]);
    }

    h = (size_t) (p - out) - 12;
    len = strlen(payload);
    memcpy(p, payload, len);
    p += len;
    n = (size_t) (p - out) + 4;

    for (i = 0; i < 4; i++) {
        out[i] = (unsigned char) (n >> (24 - 8 * i));
        out[4 + i] = (unsigned char) (h >> (24 - 8 * i));
    }

    crc = ratepool_crc32(0, out, 8);

    for (i = 0; i < 4; i++) {
        out[8 + i] = (unsigned char) (crc >> (24 - 8 * i));
    }

    crc = ratepool_crc32(0, out, n - 4);

    for (i = 0; i < 4; i++) {
        p[i] = (unsigned char) (crc >> (24 - 8 * i));
    }

    return n;
}


typedef struct {
    unsigned char  sse[4096];
    size_t         len;
    int            frames;
} es_out_t;


static int
es_collect(void *data, int kind, const unsigned char *type, size_t type_len,
    const unsigned char *payload, size_t len)
{
    long       n;
    es_out_t  *o = data;

    o->frames++;
    n = ratepool_es_sse(kind, type, type_len, payload, len,
                        o->sse + o->len, sizeof(o->sse) - o->len);

    if (n < 0) {
        return -1;
    }

    o->len += (size_t) n;

    return 0;
}


static void
test_eventstream(void)
{
    int                     ok;
    size_t                  n, i;
    es_out_t                whole, part;
    unsigned char           stream[2048], buf[4096];
    ratepool_eventstream_t  es;

    /* base64 of {"type":"message_start","message":{"usage":{"input_tokens":5}}} */
    static const char  start[] = "{\"bytes\":\"eyJ0eXBlIjoibWVzc2FnZV9zdGFydC"
        "IsIm1lc3NhZ2UiOnsidXNhZ2UiOnsiaW5wdXRfdG9rZW5zIjo1fX19\"}";
    /* base64 of {"type":"content_block_delta","delta":{"text":"hi"}} */
    static const char  delta[] = "{\"bytes\":\"eyJ0eXBlIjoiY29udGVudF9ibG9ja19k"
        "ZWx0YSIsImRlbHRhIjp7InRleHQiOiJoaSJ9fQ==\"}";

    check(ratepool_crc32(0, (const unsigned char *) "123456789", 9)
          == 0xcbf43926, "CRC-32's check value");

    n = es_frame(stream, "event", "chunk", start);
    n += es_frame(stream + n, "event", "chunk", delta);
    n += es_frame(stream + n, "exception", "throttlingException",
                  "{\"message\":\"Too many \\\"tokens\\\"\"}");

    memset(&whole, 0, sizeof(whole));
    ratepool_es_init(&es, buf, sizeof(buf));
    check(ratepool_es_feed(&es, stream, n, es_collect, &whole) == 0
          && whole.frames == 3,
          "an event stream's frames are read");

    whole.sse[whole.len] = '\0';
    check(strcmp((char *) whole.sse,
                 "event: message_start\ndata: {\"type\":\"message_start\","
                 "\"message\":{\"usage\":{\"input_tokens\":5}}}\n\n"
                 "event: content_block_delta\ndata: {\"type\":"
                 "\"content_block_delta\",\"delta\":{\"text\":\"hi\"}}\n\n"
                 "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":"
                 "\"rate_limit_error\",\"message\":\"Too many \\\"tokens\\\"\"}}"
                 "\n\n") == 0,
          "as the SSE events an Anthropic client reads, an exception as an "
          "error event");

    ok = 1;

    for (i = 1; i < n; i++) {
        memset(&part, 0, sizeof(part));
        ratepool_es_init(&es, buf, sizeof(buf));
        ok &= (ratepool_es_feed(&es, stream, i, es_collect, &part) == 0
               && ratepool_es_feed(&es, stream + i, n - i, es_collect, &part)
                  == 0
               && part.len == whole.len
               && memcmp(part.sse, whole.sse, whole.len) == 0);
    }

    check(ok, "the same, split at any byte");

    stream[20] ^= 1;
    memset(&part, 0, sizeof(part));
    ratepool_es_init(&es, buf, sizeof(buf));
    check(ratepool_es_feed(&es, stream, n, es_collect, &part) == -1
          && part.frames == 0,
          "a frame whose CRC does not hold breaks the stream");

    stream[20] ^= 1;
    memset(&part, 0, sizeof(part));
    ratepool_es_init(&es, buf, 64);
    check(ratepool_es_feed(&es, stream, n, es_collect, &part) == -1,
          "so does one larger than the buffer");
}


static size_t
b64url_decode(const unsigned char *in, size_t len, unsigned char *out)
{
    size_t    i, n;
    uint32_t  acc;
    unsigned  bits;
    int       v;

    acc = 0;
    bits = 0;
    n = 0;

    for (i = 0; i < len; i++) {
        v = in[i] >= 'A' && in[i] <= 'Z' ? in[i] - 'A'
            : in[i] >= 'a' && in[i] <= 'z' ? in[i] - 'a' + 26
            : in[i] >= '0' && in[i] <= '9' ? in[i] - '0' + 52
            : in[i] == '-' ? 62 : 63;
        acc = (acc << 6) | (uint32_t) v;
        bits += 6;

        if (bits >= 8) {
            bits -= 8;
            out[n++] = (unsigned char) (acc >> bits);
        }
    }

    return n;
}


static void
test_jwt(void)
{
    size_t           len, n, dot1, dot2;
    EVP_PKEY        *key;
    EVP_MD_CTX      *md;
    unsigned char    out[4096], part[1024];
    ratepool_jwt_t   jwt;

    check(ratepool_base64url((const unsigned char *) "foo", 3, out) == 4
          && memcmp(out, "Zm9v", 4) == 0
          && ratepool_base64url((const unsigned char *) "fo", 2, out) == 3
          && memcmp(out, "Zm8", 3) == 0
          && ratepool_base64url((const unsigned char *) "\xfb\xff", 2, out)
             == 3
          && memcmp(out, "-_8", 3) == 0,
          "base64url, unpadded, with its own two digits");

    key = EVP_RSA_gen(2048);
    check(key != NULL, "an RSA key for the test");

    if (key == NULL) {
        return;
    }

    memset(&jwt, 0, sizeof(jwt));
    jwt.key = key;
    jwt.kid = "k1";
    jwt.kid_len = 2;
    jwt.email = "gw@p.iam.gserviceaccount.com";
    jwt.email_len = strlen(jwt.email);
    jwt.aud = "https://oauth2.googleapis.com/token";
    jwt.aud_len = strlen(jwt.aud);
    jwt.scope = "https://www.googleapis.com/auth/cloud-platform";
    jwt.now = 1796083200;

    len = ratepool_jwt_sign(&jwt, out, sizeof(out));
    check(len > 0 && ratepool_jwt_sign(&jwt, out, 600) == 0,
          "a JWT is signed, or not at all where it does not fit");

    if (len == 0) {
        EVP_PKEY_free(key);
        return;
    }

    len = ratepool_jwt_sign(&jwt, out, sizeof(out));

    for (dot1 = 0; dot1 < len && out[dot1] != '.'; dot1++) { /* void */ }
    for (dot2 = dot1 + 1; dot2 < len && out[dot2] != '.'; dot2++) {
        /* void */
    }

    n = b64url_decode(out, dot1, part);
    check(len > 0 && n == 38
          && memcmp(part, "{\"alg\":\"RS256\",\"typ\":\"JWT\",\"kid\":"
                          "\"k1\"}", 38) == 0,
          "a JWT's header says RS256 and the key's id");

    n = b64url_decode(out + dot1 + 1, dot2 - dot1 - 1, part);
    part[n] = '\0';
    check(strstr((char *) part, "\"iss\":\"gw@p.iam.gserviceaccount.com\"")
          && strstr((char *) part, "\"aud\":\"https://oauth2.googleapis.com/"
                                   "token\"")
          && strstr((char *) part, "\"iat\":1796083200,\"exp\":1796086800"),
          "its claims: the account, the token endpoint, an hour");

    n = b64url_decode(out + dot2 + 1, len - dot2 - 1, part);
    md = EVP_MD_CTX_new();
    check(md && n == 256
          && EVP_DigestVerifyInit(md, NULL, EVP_sha256(), NULL, key) == 1
          && EVP_DigestVerify(md, part, n, out, dot2) == 1,
          "and its signature verifies with the account's key");

    out[dot1 + 3] ^= 1;
    check(EVP_DigestVerifyInit(md, NULL, EVP_sha256(), NULL, key) == 1
          && EVP_DigestVerify(md, part, n, out, dot2) != 1,
          "but not over other claims");

    EVP_MD_CTX_free(md);
    EVP_PKEY_free(key);
}


static void
test_error_message(void)
{
    size_t         n;
    unsigned char  out[64];

    n = ratepool_error_message(S("{\"message\":\"The provided model "
                                 "identifier is invalid.\"}"), out,
                               sizeof(out));
    check(n == 41 && memcmp(out, "The provided model identifier is "
                                 "invalid.", 41) == 0,
          "a Bedrock error's message is read");

    n = ratepool_error_message(S("{\"error\":{\"message\":\"no\"},"
                                 "\"Message\" : \"say \\\"hi\\\"\\n\\u00e9\"}"),
                               out, sizeof(out));
    check(n == 10 && memcmp(out, "say \"hi\" ?", 10) == 0,
          "its own, not a nested one, with escapes decoded");

    check(ratepool_error_message(S("{\"message\":42}"), out, sizeof(out))
          == 0
          && ratepool_error_message(S("[\"message\",\"x\"]"), out,
                                    sizeof(out)) == 0
          && ratepool_error_message(S("{\"message\":\"cut"), out, 2) == 2,
          "a message that is no string is none; a long one is cut");

    n = ratepool_error_message(S("{\"error\":{\"code\":429,\"message\":"
                                 "\"Quota exceeded\",\"status\":"
                                 "\"RESOURCE_EXHAUSTED\"}}"), out, sizeof(out));
    check(n == 14 && memcmp(out, "Quota exceeded", 14) == 0,
          "and Google's, in its error object");

    check(ratepool_error_message(S("{\"message\":\"ab\xc3\xa9\xc3\xa9\"}"),
                                 out, 4) == 4
          && ratepool_error_message(S("{\"message\":\"ab\xc3\xa9\xc3\xa9\"}"),
                                    out, 3) == 2,
          "a text cut at its room keeps whole UTF-8 characters only");

    check(ratepool_error_message(S("{\"error\":{\"error\":{\"message\":"
                                   "\"deep\"}}}"), out, sizeof(out)) == 0,
          "an error object is looked into one level deep, no deeper");

    check(strcmp(ratepool_error_type(429), "rate_limit_error") == 0
          && strcmp(ratepool_error_type(403), "permission_error") == 0
          && strcmp(ratepool_error_type(503), "overloaded_error") == 0,
          "Anthropic's error types by status");
}


static void
test_dialect(void)
{
    const char  *type, *code;

    check(ratepool_openai_path(S("/v1/chat/completions")),
          "Chat Completions is OpenAI's");
    check(ratepool_openai_path(S("/openai/v1/responses?stream=1")),
          "Responses is, behind a prefix and with a query");
    check(ratepool_openai_path(S("/v1/responses/resp_1/cancel")),
          "so are its sub-paths");
    check(!ratepool_openai_path(S("/v1/messages")),
          "Messages is Anthropic's");
    check(!ratepool_openai_path(S("/v1/complete")),
          "so is the old Text Completions");
    check(!ratepool_openai_path(S("/v1/messages?x=/chat/completions")),
          "a query does not change a path's dialect");
    check(!ratepool_openai_path(S("/v1/chat/completionsx")),
          "only whole path segments count");

    ratepool_openai_error("rate_limit_error", NULL, &type, &code);
    check(strcmp(type, "requests") == 0
          && strcmp(code, "rate_limit_exceeded") == 0,
          "a rate limit is rate_limit_exceeded");
    ratepool_openai_error("rate_limit_error", "enforced_spend_limit_reached",
                          &type, &code);
    check(strcmp(code, "insufficient_quota") == 0,
          "a spent budget is insufficient_quota");
    ratepool_openai_error("authentication_error", NULL, &type, &code);
    check(strcmp(code, "invalid_api_key") == 0,
          "a bad token is invalid_api_key");
    ratepool_openai_error("api_error", NULL, &type, &code);
    check(strcmp(type, "server_error") == 0 && code == NULL,
          "the gateway's own failures are server_error");
}


static void test_resp_check(void);


static void
test_resp(void)
{
    size_t               n;
    unsigned char        buf[64], *p;
    ratepool_resp_arg_t  args[3];

    args[0].data = (const unsigned char *) "HGET";
    args[0].len = 4;
    args[1].data = (const unsigned char *) "ratepool:{llm}:w:ci";
    args[1].len = 19;
    args[2].data = (const unsigned char *) "";
    args[2].len = 0;

    n = ratepool_resp_format(buf, sizeof(buf), args, 3);
    check(n == 46 && memcmp(buf, "*3\r\n$4\r\nHGET\r\n$19\r\n"
                                 "ratepool:{llm}:w:ci\r\n$0\r\n\r\n", 46) == 0,
          "a command is an array of bulk strings, empty ones too");

    check(ratepool_resp_format(buf, 45, args, 3) == 0,
          "a command that does not fit is not written at all");

    p = ratepool_resp_uint(buf, 18446744073709551615ULL);
    check(p - buf == 20 && memcmp(buf, "18446744073709551615", 20) == 0,
          "the largest count is written in full");

    check(ratepool_resp_header_size(12) == 5
          && ratepool_resp_arg_size(100) == 108,
          "sizes count the digits of the lengths");

    test_resp_check();
}


/* a reply, checked whole and split in two at every byte */

static int
resp_checks(const char *reply)
{
    int                    whole, split;
    size_t                 len, i;
    ratepool_resp_check_t  c;

    len = strlen(reply);

    ratepool_resp_check_init(&c);
    whole = ratepool_resp_check(&c, (const unsigned char *) reply, len);

    for (i = 1; i < len; i++) {
        ratepool_resp_check_init(&c);
        (void) ratepool_resp_check(&c, (const unsigned char *) reply, i);
        split = ratepool_resp_check(&c, (const unsigned char *) reply + i,
                                    len - i);

        if (split != whole) {
            return -1;
        }
    }

    return whole;
}


static void
test_resp_check(void)
{
    char                   big[2100];
    ratepool_resp_check_t  c;

    check(resp_checks("*3\r\n:1\r\n:-5\r\n$4\r\norg1\r\n+PONG\r\n"
                      "-NOSCRIPT No matching script.\r\n$-1\r\n*-1\r\n"
                      "*0\r\n$0\r\n\r\n") == RATEPOOL_RESP_OK,
          "replies ratepool asks for pass, split anywhere");
    check(resp_checks("*2\r\n*1\r\n*1\r\n*1\r\n:1\r\n:2\r\n")
          == RATEPOOL_RESP_OK, "arrays nest four deep");
    check(resp_checks("$3\r\na\r\n\r\n") == RATEPOOL_RESP_OK,
          "a bulk string may hold any bytes");

    check(resp_checks("*2147483647\r\n") == RATEPOOL_RESP_TOO_LARGE,
          "an array of two billion elements is refused before it comes");
    check(resp_checks("$999999999\r\n") == RATEPOOL_RESP_TOO_LARGE,
          "so is a bulk string of a gigabyte");
    check(resp_checks("*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n")
          == RATEPOOL_RESP_TOO_LARGE, "and arrays nested five deep");
    check(resp_checks(":99999999999999999999\r\n") == RATEPOOL_RESP_TOO_LARGE,
          "and a number of twenty digits");

    memset(big, 'x', sizeof(big));
    big[0] = '-';
    big[sizeof(big) - 1] = '\0';
    check(resp_checks(big) == RATEPOOL_RESP_TOO_LARGE,
          "and an error line of 2 KB");

    check(resp_checks("%2\r\n") == RATEPOOL_RESP_BAD
          && resp_checks("*1\r\n_\r\n") == RATEPOOL_RESP_BAD,
          "types hiredis 0.14 cannot read are refused");
    check(resp_checks(":1x\r\n") == RATEPOOL_RESP_BAD
          && resp_checks("*-2\r\n") == RATEPOOL_RESP_BAD
          && resp_checks("$2\r\nabc\r\n") == RATEPOOL_RESP_BAD
          && resp_checks(":1\r\r") == RATEPOOL_RESP_BAD,
          "so are malformed lines");

    ratepool_resp_check_init(&c);
    (void) ratepool_resp_check(&c, (const unsigned char *) "%", 1);
    check(ratepool_resp_check(&c, (const unsigned char *) "+OK\r\n", 5)
          == RATEPOOL_RESP_BAD, "a refusal sticks");
}


static void
test_lease(void)
{
    uint64_t  limits[RATEPOOL_LEASE_BLOCKS], cost[RATEPOOL_LEASE_BLOCKS],
              block[RATEPOOL_LEASE_BLOCKS], lease[RATEPOOL_DIMS];

    /* a workspace of 120 rpm, 60000 itpm, no otpm; an org of 600 rpm,
       300000 itpm, 60000 otpm; one live gateway: blocks of 1/8 */
    uint64_t  ws_org[] = { 120, 60000, 0, 600, 300000, 60000 };
    uint64_t  small[] = { 1, 1000, 100, 1, 1000, 100 };

    memcpy(limits, ws_org, sizeof(limits));
    memcpy(cost, small, sizeof(cost));

    ratepool_lease_blocks(limits, cost, 1, block);
    check(block[RATEPOOL_RPM] == 15 && block[RATEPOOL_ITPM] == 7500
          && block[RATEPOOL_OTPM] == 0,
          "a lease block is an eighth of each limit with one gateway, "
          "none where there is no limit");
    check(block[RATEPOOL_DIMS + RATEPOOL_RPM] == 75
          && block[RATEPOOL_DIMS + RATEPOOL_ITPM] == 37500
          && block[RATEPOOL_DIMS + RATEPOOL_OTPM] == 7500,
          "the org's blocks are sized from its own limits");

    ratepool_lease_blocks(limits, cost, 3, block);
    check(block[RATEPOOL_RPM] == 7 && block[RATEPOOL_DIMS + RATEPOOL_RPM] == 37,
          "more live gateways lease smaller blocks (a sixteenth with 3)");

    ratepool_lease_blocks(limits, cost, 0, block);
    check(block[RATEPOOL_RPM] == 15,
          "no gateway counted yet is taken as one");

    cost[RATEPOOL_ITPM] = 8000;
    ratepool_lease_blocks(limits, cost, 1, block);
    check(block[RATEPOOL_RPM] == 0 && block[RATEPOOL_ITPM] == 0
          && block[RATEPOOL_DIMS + RATEPOOL_ITPM] == 37500,
          "a block too small for the request empties that holder's lease, "
          "not the other's");

    memset(lease, 0, sizeof(lease));
    lease[RATEPOOL_RPM] = 2;
    lease[RATEPOOL_ITPM] = 1500;

    check(ratepool_lease_holds(ws_org, lease, small) == 1,
          "a lease holds a request that fits every limited dimension");

    ratepool_lease_take(ws_org, lease, small);
    check(lease[RATEPOOL_RPM] == 1 && lease[RATEPOOL_ITPM] == 500
          && lease[RATEPOOL_OTPM] == 0,
          "taking from it leaves the rest, and leaves unlimited ones alone");

    check(ratepool_lease_holds(ws_org, lease, small) == -1,
          "then it no longer holds the same request");

    memset(limits, 0, sizeof(limits));
    check(ratepool_lease_holds(limits, lease, small) == 0,
          "where nothing is limited there is nothing to hold");

    check(!ratepool_dims_zero(lease) && ratepool_dims_zero(limits),
          "a lease with anything in it is not empty");

    check(ratepool_tighter(0, 0, 0, 500) == 500
          && ratepool_tighter(0, 1, 500, 200) == 200
          && ratepool_tighter(0, 1, 200, 500) == 200,
          "of two limits or remainders the smaller is kept, in any order");
    check(ratepool_tighter(1, 1, 1000, 2000) == 2000
          && ratepool_tighter(1, 1, 2000, 1000) == 2000,
          "of two resets the later is kept");
}


static void
test_home(void)
{
    long                  i;
    uint64_t              full, home, soonest;
    ratepool_turn_t       last;
    ratepool_candidate_t  c[3];

    check(ratepool_home_key(42, (const unsigned char *) "claude-sonnet-4-6",
                            17)
          == ratepool_home_key(42, (const unsigned char *)
                                   "claude-sonnet-4-6", 17)
          && ratepool_home_key(42, (const unsigned char *)
                                   "claude-sonnet-4-6", 17)
             != ratepool_home_key(42, (const unsigned char *)
                                      "claude-haiku-4-5", 16)
          && ratepool_home_key(42, (const unsigned char *) "m", 1)
             != ratepool_home_key(43, (const unsigned char *) "m", 1),
          "a conversation's key is its id's for one model");

    last.bytes = 0;
    last.total = 0;
    last.cached = 0;
    check(ratepool_home_cost(&last, 1000, 0, &full, &home) == 0,
          "a conversation with no turn yet has no cost of its own");

    /* 80 kB counted 20000 tokens, 19000 of them cached up to its last
       breakpoint; the next turn adds 5.2 kB */
    last.bytes = 80000;
    last.total = 20000;
    last.cached = 19000;
    check(ratepool_home_cost(&last, 85200, 0, &full, &home) == 1
          && full == 21300 && home == 2300,
          "a turn costs its home only what its last turn did not cache");

    check(ratepool_home_cost(&last, 40000, 0, &full, &home) == 1
          && full == 10000 && home == 10000,
          "a shorter body was rewritten: all of it is written anew");

    last.cached = 6000;
    check(ratepool_home_cost(&last, 40000, 1, &full, &home) == 1
          && full == 10000 && home == 4000,
          "a shorter body after a shared prefix reads that prefix");

    last.cached = 25000;
    check(ratepool_home_cost(&last, 80000, 0, &full, &home) == 1
          && home == 1,
          "a turn with nothing new still costs a token");

    check(ratepool_home_move_ms(21300, 2300, 30000) == 38000,
          "a move that writes 19000 tokens more costs an org of 30000 "
          "tokens a minute 38 s of refill");
    check(ratepool_home_move_ms(21300, 2300, 0) == RATEPOOL_HOME_WAIT_MS,
          "an org of unknown limits is worth a few seconds' wait");

    memset(c, 0, sizeof(c));

    for (i = 0; i < 3; i++) {
        c[i].usable = 1;
        c[i].headroom_permille = 900;
    }

    c[1].home = 1;
    c[1].headroom_permille = 100;

    check(ratepool_pick_home(c, 3, 1000, 0, &soonest) == 1,
          "a conversation goes home while home has room, however little");

    c[1].free_at_ms = 3000;
    check(ratepool_pick_home(c, 3, 1000, 5000, &soonest) == -1
          && soonest == 3000,
          "it waits for its home when that costs less than a move");

    i = ratepool_pick_home(c, 3, 1000, 1000, &soonest);
    check(i == 0 || i == 2,
          "and moves when waiting would cost more, or may not be waited");

    c[1].cooling = 1;
    i = ratepool_pick_home(c, 3, 1000, 5000, &soonest);
    check(i == 0 || i == 2,
          "a home cooling after the provider refused it is not waited for");
    c[1].cooling = 0;

    c[1].usable = 0;
    i = ratepool_pick_home(c, 3, 1000, 60000, &soonest);
    check(i == 0 || i == 2,
          "a home that cannot be used (cooling, spent, tried) is left");

    c[0].home = 1;
    c[0].usable = 1;
    c[1].usable = 1;
    c[1].free_at_ms = 0;
    c[0].headroom_permille = 50;
    c[1].headroom_permille = 700;
    check(ratepool_pick_home(c, 3, 1000, 0, &soonest) == 1,
          "among the keys of its home org, the one with most headroom");

    memset(c, 0, sizeof(c));

    for (i = 0; i < 3; i++) {
        c[i].usable = 1;
        c[i].headroom_permille = 900;
        c[i].org_homes = 3;
    }

    c[0].headroom_permille = 100;
    c[0].org_homes = 1;
    check(ratepool_pick_new(c, 3, 1000, &soonest) == 0,
          "a first turn goes to the org home to the fewest conversations, "
          "though others have more headroom now");
    check(ratepool_pick(c, 3, 1000, &soonest) != 0,
          "where a request of no conversation goes by headroom");

    c[0].free_at_ms = 2000;
    check(ratepool_pick_new(c, 3, 1000, &soonest) != 0,
          "an org without room now is not waited for");
}


int
main(void)
{
    test_bucket();
    test_home();
    test_lease();
    test_pick();
    test_cooldown();
    test_parse();
    test_usage();
    test_budget();
    test_price();
    test_request();
    test_conversation();
    test_conversation_openai();
    test_conversation_bad();
    test_conversation_deep();
    test_conversation_text();
    test_reserve();
    test_resp();
    test_spent();
    test_too_large();
    test_dialect();
    test_normalize();
    test_usage_chunk();
    test_fallback();
    test_sigv4();
    test_error_message();
    test_eventstream();
    test_jwt();

    printf("1..%d\n", tests);

    return failures ? 1 : 0;
}

#!/usr/bin/env perl

# mock_provider.pl: a scriptable stand-in for the Anthropic Messages API.
#
#   perl t/lib/mock_provider.pl --port N [--listen 127.0.0.1]
#        [--config FILE.json] [--log FILE.jsonl] [--stream-delay-ms 50]
#
# One process, one IO::Select loop with timers: many concurrent keep-alive
# HTTP/1.1 connections, delayed answers and slowly streamed SSE bodies, and
# no connection can block another.
#
# Config (file, or POST /_mock/config), every field optional:
#   {"keys": {"sk-ant-mock-a1": {"org": "org-a", "name": "a1"}},
#    "orgs": {"org-a": {"rpm": 50, "itpm": 30000, "otpm": 8000,
#                       "itpm_cache_reads": false,
#                       "tpm": 40000,   (OpenAI's one limit for all tokens)
#                       "project_tpm": 20000,   (and a project's, lower)
#                       "models": {"claude-opus": {"rpm": 5, ...}}}},
#    "latency_ms": 0, "stream_delay_ms": 50,
#    "close_reused": false,   (true: close a reused connection unanswered)
#    "prompt_cache": false,   (true: per-org prompt caches, see below)
#    "cache_ttl_s": 300, "cache_ttl_1h_s": 3600,   (their lifetimes)
#    "log_body": true,        (false: the log leaves request bodies out)
#    "aws": {"AKID": {"secret": "...", "token": "..."}}}
#                             (AWS credentials for Bedrock's SigV4; the
#                              key's org and name are in "keys" under AKID)
#
# Amazon Bedrock's Messages API (POST /anthropic/v1/messages): Anthropic's
# format with a Bedrock model id (anthropic.claude-..., us./eu./apac./
# global. profiles), authenticated by a Bedrock API key (Bearer, a key in
# "keys") or by SigV4, which is checked by computing it again (service
# bedrock, the signed headers, the body's SHA-256, the date within five
# minutes, a session token where the credentials have one).  Answers are
# Anthropic's, without Anthropic's rate-limit headers; errors are
# Bedrock's: {"message": ...} with x-amzn-errortype (a 429 is a
# ThrottlingException with no retry-after).
#
# Bedrock's InvokeModel (POST /model/{id}/invoke and /invoke-with-response-
# stream), authenticated the same way: the body must have anthropic_version
# "bedrock-2023-05-31" and no "model" or "stream"; a stream answers
# application/vnd.amazon.eventstream frames (CRC32s, {"bytes": base64 of
# one Anthropic event}, invocation metrics in the last), split at awkward
# places; a scripted stream_error is an exception frame.
#
# Prompt caches ("prompt_cache": true), with the provider's rules: one
# cache per org (keys of an org share it) and model.  Messages API: the
# prefix runs tools -> system -> messages, one block per tool, system
# block (a string system is one block) and message content block (a
# string content is one); a block's identity is its JSON re-encoded
# without cache_control, so moving a breakpoint keeps the prefix.
# Breakpoints are the blocks with cache_control {"type":"ephemeral"}
# ("ttl":"1h" for the longer lifetime), plus the last block when the body
# has a top-level cache_control; more than 4 is a 400.  Each breakpoint
# reads the longest live cached prefix ending at one of the 20 block
# boundaries up to it, and writes its own prefix; a read refreshes the
# TTL.  Prefixes under 1024 tokens are neither read nor written.  Usage:
# cache_read_input_tokens up to the hit, cache_creation_input_tokens from
# there to the last breakpoint, input_tokens the rest of the body's
# estimate (a token per 4 bytes, block sizes from their encoding).  Reads
# are free against itpm unless the org has itpm_cache_reads.  Chat
# Completions: automatic, the longest cached prefix ending at a message
# boundary is read and the whole prompt written when 1024+ tokens; it is
# reported as prompt_tokens_details.cached_tokens and counts toward tpm.
# x-mock-usage and scripts override single usage fields as before.
#
# Steering, per request (headers the gateway forwards unchanged):
#   x-mock-delay-ms, x-mock-stream-delay-ms, x-mock-status, x-mock-retry-after,
#   x-mock-usage (JSON object overriding usage fields), x-mock-text-bytes
#   (an answer text of that many bytes, streamed 40 bytes a delta),
#   x-mock-gzip (a JSON answer gzipped, as if the provider ignored the
#   request's Accept-Encoding); a request the org's buckets refuse gets
#   its 429 at once, without the delays
# Steering, per key (POST /_mock/script), one action consumed per request:
#   {"key": K, "sticky": false, "actions": [{"status": 429, "retry_after": "7",
#    "headers": {...}, "delay_ms": N, "body": STRING_OR_OBJECT,
#    "usage": {...}, "stream_error": "overloaded_error"}, ...]}
# Control: POST /_mock/reset, POST /_mock/config, GET /_mock/config,
#   GET /_mock/log, GET|HEAD /_mock/health.  The log (and the --log file,
#   a JSON line each) records every /v1/ request; an answered message
#   carries "usage": the four counts it was answered with, in Anthropic's
#   names whatever the dialect; one the org's buckets refused, "refused":
#   which (rpm, itpm, otpm, tpm).

use strict;
use warnings;

use Digest::SHA qw(hmac_sha256 hmac_sha256_hex sha256_hex);
use Encode ();
use Errno qw(EAGAIN EINTR EWOULDBLOCK);
use File::Path ();
use File::Temp ();
use Getopt::Long qw(GetOptions);
use Compress::Raw::Zlib ();
use IO::Compress::Gzip qw(gzip $GzipError);
use MIME::Base64 qw(encode_base64);
use IO::Select;
use IO::Socket::INET;
use JSON::PP;
use List::Util qw(max min);
use POSIX qw(ceil floor strftime);
use Scalar::Util qw(looks_like_number);
use Socket qw(IPPROTO_TCP TCP_NODELAY);
use Time::HiRes qw(time);
use Time::Local ();

my %opt = (listen => '127.0.0.1', 'stream-delay-ms' => 50);
GetOptions(\%opt, 'port=i', 'listen=s', 'config=s', 'log=s',
    'stream-delay-ms=i')
    or die "usage: $0 --port N [--listen ADDR] [--config FILE] [--log FILE]"
    . " [--stream-delay-ms MS]\n";
die "$0: --port is required\n" unless defined $opt{port};

# JSON with "type" first and the other keys sorted, like the real API's
# event objects and stable for tests.
my $JSON = JSON::PP->new->utf8->allow_nonref->sort_by(sub {
    ($JSON::PP::a ne 'type') <=> ($JSON::PP::b ne 'type')
        or $JSON::PP::a cmp $JSON::PP::b
});

my %ERROR_TYPE = (
    400 => 'invalid_request_error', 401 => 'authentication_error',
    402 => 'billing_error',         403 => 'permission_error',
    404 => 'not_found_error',       405 => 'invalid_request_error',
    409 => 'conflict_error',        413 => 'request_too_large',
    429 => 'rate_limit_error',      500 => 'api_error',
    504 => 'timeout_error',         529 => 'overloaded_error',
);

my %ERROR_MESSAGE = (
    400 => 'Invalid request',
    401 => 'invalid x-api-key',
    402 => 'Your credit balance is too low to access the Anthropic API.',
    403 => 'Your API key does not have permission to use the specified'
         . ' resource.',
    404 => 'Not found',
    409 => 'Conflict',
    413 => 'Request exceeds the maximum allowed number of bytes.',
    429 => 'Number of requests has exceeded your rate limit.',
    500 => 'Internal server error',
    504 => 'Request timed out',
    529 => 'Overloaded',
);

my %LIMIT_NAME = (rpm => 'requests', itpm => 'input tokens',
                  otpm => 'output tokens', tpm => 'tokens',
                  project_tpm => 'tokens');

my %REASON = (
    200 => 'OK', 400 => 'Bad Request', 401 => 'Unauthorized',
    402 => 'Payment Required', 403 => 'Forbidden', 404 => 'Not Found',
    405 => 'Method Not Allowed', 409 => 'Conflict',
    413 => 'Payload Too Large', 429 => 'Too Many Requests',
    500 => 'Internal Server Error', 502 => 'Bad Gateway',
    503 => 'Service Unavailable', 504 => 'Gateway Timeout', 529 => 'Overloaded',
);

my $RATE_LIMIT_DOCS = 'For details, refer to: https://docs.claude.com/en/api/'
    . 'rate-limits. You can see the response headers for current usage. Please'
    . ' reduce the prompt length or the maximum tokens requested, or try again'
    . ' later. You may also contact sales at https://www.anthropic.com/'
    . 'contact-sales to discuss your options for a rate limit increase.';

my $config = normalize_config({});
my %bucket;     # "org|class|rpm" => { tokens => available, at => epoch s }
my %cache;      # org => { prefix digest => { expires => epoch s, ttl_s } }
my %pruned;     # org => epoch s its cache was last rid of expired entries
my %script;     # credential => { actions => [...], sticky => bool }
my @log;        # request records, see log_request()
my @timers;     # [ due epoch s, sequence, code ]
my $timer_seq = 0;
my %conns;      # "$fh" => connection, see accept_clients()
my $conn_seq = 0;
my $running = 1;
my $log_fh;

if (defined $opt{config}) {
    open my $fh, '<', $opt{config} or die "$0: $opt{config}: $!\n";
    $config = normalize_config($JSON->decode(do { local $/; <$fh> }));
}

if (defined $opt{log}) {
    open $log_fh, '>>', $opt{log} or die "$0: $opt{log}: $!\n";
    $log_fh->autoflush(1);
}

my $server = IO::Socket::INET->new(
    LocalAddr => $opt{listen},
    LocalPort => $opt{port},
    Proto     => 'tcp',
    Listen    => 128,
    ReuseAddr => 1,
) or die "$0: cannot listen on $opt{listen}:$opt{port}: $@\n";
$server->blocking(0);

my $readers = IO::Select->new($server);

$SIG{PIPE} = 'IGNORE';
$SIG{TERM} = $SIG{INT} = sub { $running = 0 };

STDERR->autoflush(1);
print STDERR "mock provider listening on $opt{listen}:",
    $server->sockport, "\n";

while ($running) {
    my @writing = map { $_->{fh} } grep { length $_->{wbuf} } values %conns;
    my ($readable, $writable) = IO::Select->select($readers,
        @writing ? IO::Select->new(@writing) : undef, undef, select_timeout());

    for my $fh (@{ $writable || [] }) {
        my $c = $conns{$fh} or next;
        guarded($c, 'write', sub { flush($c) });
    }

    for my $fh (@{ $readable || [] }) {
        if ($fh == $server) {
            guarded(undef, 'accept', \&accept_clients);
            next;
        }
        my $c = $conns{$fh} or next;
        guarded($c, 'read', sub { on_readable($c) });
    }

    run_due_timers();
}

close_conn($_) for values %conns;
close $server;
exit 0;

# --- event loop plumbing -------------------------------------------------

sub guarded {
    my ($c, $what, $code) = @_;

    return if eval { $code->(); 1 };

    warn "mock provider: $what failed: $@";
    close_conn($c) if $c;
}

sub later {
    my ($ms, $code) = @_;

    return $code->() unless looks_like_number($ms) && $ms > 0;
    push @timers, [ time + $ms / 1000, ++$timer_seq, $code ];
}

sub select_timeout {
    return 1 unless @timers;
    my $next = min(map { $_->[0] } @timers);
    return max(0, min(1, $next - time));
}

sub run_due_timers {
    my $now = time;
    my @due = sort { $a->[0] <=> $b->[0] || $a->[1] <=> $b->[1] }
              grep { $_->[0] <= $now } @timers;
    return unless @due;

    @timers = grep { $_->[0] > $now } @timers;
    guarded(undef, 'timer', $_->[2]) for @due;
}

sub accept_clients {
    while (my $fh = $server->accept) {
        $fh->blocking(0);
        setsockopt($fh, IPPROTO_TCP, TCP_NODELAY, 1);
        $conns{$fh} = {
            fh => $fh, id => ++$conn_seq, rbuf => '', wbuf => '',
            busy => 0, close_after => 0, closed => 0,
        };
        $readers->add($fh);
    }
}

sub on_readable {
    my ($c) = @_;

    my $n = sysread($c->{fh}, my $buf, 65536);

    if (!defined $n) {
        return if $! == EAGAIN || $! == EWOULDBLOCK || $! == EINTR;
        return close_conn($c);
    }

    if ($n == 0) {
        # the peer is done sending: answer what is buffered, then close
        $readers->remove($c->{fh});
        $c->{eof} = 1;
        return process($c);
    }

    $c->{rbuf} .= $buf;
    process($c);
}

sub queue_write {
    my ($c, $bytes) = @_;

    return if $c->{closed};
    $c->{wbuf} .= $bytes;
    flush($c);
}

sub flush {
    my ($c) = @_;

    while (length $c->{wbuf}) {
        my $n = syswrite($c->{fh}, $c->{wbuf});
        if (!defined $n) {
            return if $! == EAGAIN || $! == EWOULDBLOCK || $! == EINTR;
            return close_conn($c);
        }
        substr($c->{wbuf}, 0, $n, '');
    }

    close_conn($c) if $c->{close_after} && !$c->{busy};
}

# The current response is complete: go on with the next request, if any.
sub finish {
    my ($c) = @_;

    $c->{busy} = 0;

    if ($c->{close_after}) {
        close_conn($c) unless length $c->{wbuf};
        return;
    }

    process($c);
}

sub close_conn {
    my ($c) = @_;

    return if $c->{closed};
    $c->{closed} = 1;
    $readers->remove($c->{fh});
    delete $conns{ $c->{fh} };
    close $c->{fh};
}

# --- HTTP parsing --------------------------------------------------------

sub process {
    my ($c) = @_;

    while (!$c->{busy} && !$c->{closed} && !$c->{close_after}) {
        my $req = parse_request($c) or last;
        $req->{conn} = $c->{id};
        $c->{busy} = 1;

        # "close_reused": a keep-alive connection the server had already
        # given up on, as a provider's load balancer does now and then
        if ($config->{close_reused} && $c->{served}++
            && ($req->{path} // '') !~ m{^/_mock/})
        {
            return close_conn($c);
        }

        if ($req->{bad}) {
            $req->{close} = 1;
            reply($c, $req, error_res($req, 400, 'invalid_request_error',
                                      $req->{bad}));
            next;
        }

        dispatch($c, $req);
    }

    if ($c->{eof} && !$c->{busy} && !$c->{closed}) {
        $c->{close_after} = 1;
        close_conn($c) unless length $c->{wbuf};
    }
}

# Takes one complete request off the connection's read buffer; returns
# undef while more bytes are needed.
sub parse_request {
    my ($c) = @_;
    my $buf = \$c->{rbuf};

    $$buf =~ s/\A(?:\r?\n)+//;

    unless ($$buf =~ /\A(.*?)\r?\n\r?\n/s) {
        return length $$buf > 65536 ? bad_request('header too large') : undef;
    }
    my ($head, $head_len) = ($1, $+[0]);

    my ($line, @lines) = split /\r?\n/, $head;
    my ($method, $target, $version) =
        $line =~ m{^([A-Z]+)\s+(\S+)(?:\s+HTTP/(\d\.\d))?\s*$}
        or return bad_request('malformed request line');

    my (%headers, @order);
    for (@lines) {
        my ($name, $value) = /^([^:\s]+)\s*:\s*(.*?)\s*$/ or next;
        $name = lc $name;
        push @order, $name unless exists $headers{$name};
        $headers{$name} = exists $headers{$name}
                        ? "$headers{$name}, $value" : $value;
    }

    my ($body, $consumed) = ('', $head_len);

    if (($headers{'transfer-encoding'} // '') =~ /chunked/i) {
        my $pos = $head_len;
        while (1) {
            pos($$buf) = $pos;
            $$buf =~ /\G([0-9a-fA-F]+)[^\r\n]*\r\n/gc or return undef;
            my $size = hex $1;
            $pos = pos($$buf);
            if ($size == 0) {
                # trailer section, ended by an empty line
                pos($$buf) = $pos;
                $$buf =~ /\G(?:[^\r\n]+\r\n)*\r\n/gc or return undef;
                $consumed = pos($$buf);
                last;
            }
            return undef if length($$buf) < $pos + $size + 2;
            $body .= substr($$buf, $pos, $size);
            $pos += $size + 2;
        }

    } elsif (defined(my $len = $headers{'content-length'})) {
        return bad_request('invalid content-length') unless $len =~ /^\d+$/;
        return undef if length($$buf) < $head_len + $len;
        $body = substr($$buf, $head_len, $len);
        $consumed = $head_len + $len;
    }

    substr($$buf, 0, $consumed, '');

    my $http10 = !defined $version || $version eq '1.0';
    my $conn = lc($headers{connection} // '');

    return {
        method  => $method,
        target  => $target,
        path    => (split /\?/, $target, 2)[0],
        headers => \%headers,
        body    => $body,
        http10  => $http10,
        close   => $conn =~ /close/
                   || ($http10 && $conn !~ /keep-alive/) ? 1 : 0,
        t_ms    => time * 1000,
        rid     => 'req_' . random_id(24),
    };
}

sub bad_request {
    my ($why) = @_;
    return { bad => $why, method => 'GET', rid => 'req_' . random_id(24) };
}

# --- responses ------------------------------------------------------------

sub reply {
    my ($c, $req, $res) = @_;

    my @headers = (['request-id', $req->{rid}], @{ $res->{headers} || [] });

    if ($req->{close} || ($res->{stream} && $req->{http10})) {
        push @headers, ['connection', 'close'];
        $c->{close_after} = 1;
    } elsif ($req->{http10}) {
        push @headers, ['connection', 'keep-alive'];
    }

    later($res->{delay_ms}, sub {
        return if $c->{closed};
        return start_stream($c, $req, $res, \@headers) if $res->{stream};

        my $body = $res->{body} // '';
        push @headers, ['content-length', length $body];
        queue_write($c, status_line($res->{status}, \@headers)
                        . ($req->{method} eq 'HEAD' ? '' : $body));
        finish($c);
    });
}

# Writes the head, then one HTTP chunk per piece with a pause between
# pieces; an HTTP/1.0 peer gets the bare bytes, ended by closing.
sub start_stream {
    my ($c, $req, $res, $headers) = @_;

    my $chunked = !$req->{http10};
    push @$headers, ['transfer-encoding', 'chunked'] if $chunked;
    queue_write($c, status_line($res->{status}, $headers));

    my @pieces = @{ $res->{stream} };
    my $send_next;
    $send_next = sub {
        if ($c->{closed}) {
            undef $send_next;
            return;
        }

        my $piece = shift @pieces;
        my $out = $chunked ? sprintf("%x\r\n%s\r\n", length $piece, $piece)
                           : $piece;
        $out .= "0\r\n\r\n" if $chunked && !@pieces;
        queue_write($c, $out);

        if (@pieces) {
            later($res->{piece_delay_ms}, $send_next);
        } else {
            undef $send_next;
            finish($c);
        }
    };

    $send_next->();
}

sub status_line {
    my ($status, $headers) = @_;

    return "HTTP/1.1 $status " . ($REASON{$status} // 'Status') . "\r\n"
        . join('', map { "$_->[0]: $_->[1]\r\n" } @$headers) . "\r\n";
}

sub json_res {
    my ($status, $data, @headers) = @_;

    return {
        status  => $status,
        headers => [ ['content-type', 'application/json'], @headers ],
        body    => $JSON->encode($data),
    };
}

sub error_res {
    my ($req, $status, $type, $message, @headers) = @_;

    if (openai_path($req->{path})) {
        # OpenAI's error object: its type and code, its request id header
        my %code = (401 => 'invalid_api_key', 429 => 'rate_limit_exceeded');
        return json_res($status, {
            error => { message => $message,
                       type => $status == 429 ? 'requests'
                             : $status >= 500 ? 'server_error'
                             : 'invalid_request_error',
                       param => undef, code => $code{$status} },
        }, ['x-request-id', $req->{rid}], @headers);
    }

    return json_res($status, {
        type       => 'error',
        error      => { type => $type, message => $message },
        request_id => $req->{rid},
    }, @headers);
}

sub openai_path { ($_[0] // '') eq '/v1/chat/completions' }

# --- Amazon Bedrock --------------------------------------------------------

my %BEDROCK_ERROR = (
    400 => 'ValidationException',
    401 => 'AccessDeniedException',
    403 => 'AccessDeniedException',
    429 => 'ThrottlingException',
    500 => 'InternalServerException',
    503 => 'ServiceUnavailableException',
    529 => 'ServiceUnavailableException',
);

sub bedrock_error {
    my ($status, $type, $message) = @_;

    return {
        status  => $status,
        headers => [ ['content-type', 'application/json'],
                     ['x-amzn-requestid', random_id(36)],
                     ['x-amzn-errortype', "$type:http://internal.amazon.com/"
                                          . 'coral/com.amazon.bedrock/'] ],
        body    => $JSON->encode({ message => $message }),
    };
}

# Bedrock's authentication: (the SigV4 access key id, undef), or (undef,
# the error answer); a Bedrock API key is (undef, undef)
sub bedrock_auth {
    my ($req) = @_;
    my $auth = $req->{headers}{authorization} // '';

    if ($auth =~ /^AWS4-HMAC-SHA256 /) {
        my $error = sigv4_error($req);
        return (undef, bedrock_error(403, @$error)) if $error;
        return ($auth =~ m{Credential=([^/]+)/}, undef);
    }

    return (undef, undef)
        if $auth =~ /^Bearer\s+(\S+)/i && ref $config->{keys}{$1} eq 'HASH';

    return (undef, bedrock_error(403, 'UnrecognizedClientException',
                                 'The security token included in the '
                                 . 'request is invalid.'));
}

# An answer of provider() as Bedrock's: no Anthropic rate-limit headers,
# no org, no retry-after; errors in Bedrock's shape
sub as_bedrock {
    my ($res) = @_;

    my @headers = grep { $_->[0] !~ /^(?:anthropic-|retry-after$)/i }
                  @{ $res->{headers} || [] };
    push @headers, ['x-amzn-requestid', random_id(36)];

    if ($res->{status} != 200) {
        my $error = eval { $JSON->decode($res->{body}) } || {};
        my $status = $res->{status} == 529 ? 503 : $res->{status};
        my $message = $res->{status} == 429
            ? 'Too many requests, please wait before trying again.'
            : $error->{error}{message} // 'error';
        return { %{ bedrock_error($status,
                        $BEDROCK_ERROR{$status} // 'InternalServerException',
                        $message) },
                 delay_ms => $res->{delay_ms} };
    }

    $res->{headers} = \@headers;
    return $res;
}

sub bedrock_model_ok {
    return ($_[0] // '') =~ /^(?:(?:us|eu|apac|global)\.)?anthropic\.claude-/;
}

sub bedrock {
    my ($req) = @_;

    my ($signed, $refused) = bedrock_auth($req);
    return $refused if $refused;

    return bedrock_error(405, 'ValidationException', 'Method not allowed')
        unless $req->{method} eq 'POST';

    my $payload = eval { $JSON->decode($req->{body}) };
    return bedrock_error(400, 'ValidationException',
                         'Malformed input request, please reformat your '
                         . 'input and try again.')
        unless ref $payload eq 'HASH';
    return bedrock_error(400, 'ValidationException',
                         'The provided model identifier is invalid.')
        unless bedrock_model_ok($payload->{model});

    return as_bedrock(provider({ %$req, path => '/v1/messages' }, $signed));
}

# InvokeModel: the model in the path, Bedrock's version in the body
sub bedrock_invoke {
    my ($req, $escaped, $stream) = @_;

    my ($signed, $refused) = bedrock_auth($req);
    return $refused if $refused;

    (my $model = $escaped) =~ s/%([0-9A-Fa-f]{2})/chr hex $1/ge;
    return bedrock_error(400, 'ValidationException',
                         'The provided model identifier is invalid.')
        unless bedrock_model_ok($model);

    my $payload = eval { $JSON->decode($req->{body}) };
    return bedrock_error(400, 'ValidationException',
                         'Malformed input request, please reformat your '
                         . 'input and try again.')
        unless ref $payload eq 'HASH';

    for my $extra (grep { exists $payload->{$_} } qw(model stream)) {
        return bedrock_error(400, 'ValidationException',
                             "Malformed input request: #: extraneous key "
                             . "[$extra] is not permitted, please reformat "
                             . 'your input and try again.');
    }

    return bedrock_error(400, 'ValidationException',
                         'Malformed input request: #: required key '
                         . '[anthropic_version] not found')
        unless ($payload->{anthropic_version} // '') eq 'bedrock-2023-05-31';

    # a beta flag this model does not take refuses the whole request
    my %takes = map { $_ => 1 } @{ $config->{bedrock_betas} || [] };
    for my $flag (@{ $payload->{anthropic_beta} || [] }) {
        return bedrock_error(400, 'ValidationException',
                             "invalid beta flag: $flag")
            unless $takes{$flag};
    }
    delete $payload->{anthropic_beta};

    # answered as the Messages API would, then framed as Bedrock frames it
    my %as_messages = %$payload;
    delete $as_messages{anthropic_version};
    $as_messages{model} = $model;
    $as_messages{stream} = JSON::PP::true if $stream;

    my $res = as_bedrock(provider({ %$req, path => '/v1/messages',
                                    body => $JSON->encode(\%as_messages),
                                    wire_body => $req->{body} }, $signed));

    return $res unless $res->{status} == 200 && $res->{stream};

    my (@frames, $input, $output);
    for my $event (split /\n\n/, join '', @{ $res->{stream} }) {
        my ($type) = $event =~ /^event: (\S+)/m;
        my ($data) = $event =~ /^data: (.*)$/m;
        next unless defined $data;

        my $json = $JSON->decode($data);
        $input //= $json->{message}{usage}{input_tokens};
        $output = $json->{usage}{output_tokens} // $output;

        if ($type eq 'error') {
            my $e = $json;
            push @frames, es_frame([ [':message-type', 'exception'],
                                     [':exception-type',
                                      'modelStreamErrorException'],
                                     [':content-type', 'application/json'] ],
                                   $JSON->encode({ message =>
                                                   $e->{error}{message} }));
            next;
        }

        if ($type eq 'message_stop') {
            my $stop = $json;
            $stop->{'amazon-bedrock-invocationMetrics'} = {
                inputTokenCount  => $input // 0,
                outputTokenCount => $output // 0,
            };
            $data = $JSON->encode($stop);
        }

        push @frames, es_frame([ [':event-type', 'chunk'],
                                 [':content-type', 'application/json'],
                                 [':message-type', 'event'] ],
                               $JSON->encode({ bytes =>
                                   encode_base64($data, '') }));

        # x-mock-es-metadata: an event of a type clients never see
        push @frames, es_frame([ [':event-type', 'metadata'],
                                 [':message-type', 'event'] ], '{}')
            if $req->{headers}{'x-mock-es-metadata'} && @frames == 1;
    }

    $res->{headers} = [ grep { $_->[0] ne 'content-type' }
                        @{ $res->{headers} } ];
    push @{ $res->{headers} },
        ['content-type', 'application/vnd.amazon.eventstream'];
    $res->{stream} = [ awkward_pieces(join '', @frames) ];

    return $res;
}

# --- Google -----------------------------------------------------------------

my %google_token;      # access token => { email, expires }

sub b64url_decode {
    (my $s = shift // '') =~ tr{-_}{+/};
    $s .= '=' x ((4 - length($s) % 4) % 4);
    return MIME::Base64::decode_base64($s);
}

sub google_error {
    my ($status, $message) = @_;
    my %name = (400 => 'INVALID_ARGUMENT', 401 => 'UNAUTHENTICATED',
                403 => 'PERMISSION_DENIED', 429 => 'RESOURCE_EXHAUSTED',
                500 => 'INTERNAL', 503 => 'UNAVAILABLE');

    return json_res($status, { error => { code => $status + 0,
                                          message => $message,
                                          status => $name{$status}
                                                    // 'UNKNOWN' } });
}

sub google_token {
    my ($req) = @_;
    my %form = map { my ($k, $v) = split /=/, $_, 2;
                     $v //= '';
                     $v =~ s/%([0-9A-Fa-f]{2})/chr hex $1/ge;
                     ($k => $v) } split /&/, $req->{body} // '';
    my $refuse = sub {
        log_request({ req => $req, credential => $_[1] }, 400);
        return json_res(400, { error => 'invalid_grant',
                               error_description => $_[0] });
    };

    return $refuse->('Invalid grant_type') unless ($form{grant_type} // '')
        eq 'urn:ietf:params:oauth:grant-type:jwt-bearer';

    my ($h, $c, $sig) = split /\./, $form{assertion} // '';
    my $header = eval { $JSON->decode(b64url_decode($h)) } || {};
    my $claims = eval { $JSON->decode(b64url_decode($c)) } || {};
    my $email = $claims->{iss} // '';
    my $account = $config->{google}{$email}
        or return $refuse->('Invalid JWT: no such account', $email);

    return $refuse->('Invalid JWT: not RS256', $email)
        unless ($header->{alg} // '') eq 'RS256';
    return $refuse->('Invalid JWT: Token must be a short-lived token (60 '
                     . 'minutes) and in a reasonable timeframe', $email)
        unless abs(($claims->{iat} // 0) - time) <= 300
               && ($claims->{exp} // 0) - ($claims->{iat} // 0) <= 3600
               && ($claims->{exp} // 0) > time;
    return $refuse->('Invalid JWT: no cloud-platform scope', $email)
        unless ($claims->{scope} // '') =~ m{auth/cloud-platform};

    # the signature, by the account's public key
    my $dir = File::Temp::tempdir(CLEANUP => 1);
    open my $d, '>', "$dir/data" or die; print {$d} "$h.$c"; close $d;
    open my $s, '>', "$dir/sig" or die; binmode $s;
    print {$s} b64url_decode($sig); close $s;
    my $ok = system('openssl', 'dgst', '-sha256', '-verify',
                    $account->{public_key_file}, '-signature', "$dir/sig",
                    "$dir/data") == 0;
    File::Path::remove_tree($dir);
    return $refuse->('Invalid JWT Signature.', $email) unless $ok;

    my $ttl = $config->{token_ttl} // 3599;
    my $token = 'ya29.mock-' . random_id(40);
    $google_token{$token} = { email => $email, expires => time + $ttl };
    log_request({ req => $req, credential => $email, key_name => 'token' },
                200);

    return json_res(200, { access_token => $token, expires_in => $ttl + 0,
                           token_type => 'Bearer' });
}

# Vertex AI: a token, then Anthropic's API with the model in the path
sub vertex {
    my ($req, $model, $stream) = @_;

    my ($token) = ($req->{headers}{authorization} // '') =~ /^Bearer (\S+)$/;
    my $grant = defined $token ? $google_token{$token} : undef;

    return google_error(401, 'Request had invalid authentication '
                        . 'credentials. Expected OAuth 2 access token, login '
                        . 'cookie or other valid authentication credential.')
        unless $grant && $grant->{expires} > time;

    my $payload = eval { $JSON->decode($req->{body}) };
    return google_error(400, 'Invalid JSON payload received.')
        unless ref $payload eq 'HASH';
    return google_error(400, 'model: Extra inputs are not permitted')
        if exists $payload->{model};
    return google_error(400, 'anthropic_version: Input should be '
                        . "'vertex-2023-10-16'")
        unless ($payload->{anthropic_version} // '') eq 'vertex-2023-10-16';
    return google_error(400, 'stream: streamRawPredict streams, rawPredict '
                        . 'does not')
        unless !!$payload->{stream} == !!$stream;

    my %as_messages = %$payload;
    delete $as_messages{anthropic_version};
    $as_messages{model} = $model;

    my $res = provider({ %$req, path => '/v1/messages',
                         body => $JSON->encode(\%as_messages),
                         wire_body => $req->{body} }, $grant->{email});

    my @headers = grep { $_->[0] !~ /^(?:anthropic-|retry-after$)/i }
                  @{ $res->{headers} || [] };

    if ($res->{status} != 200) {
        my $error = eval { $JSON->decode($res->{body}) } || {};
        my $status = $res->{status} == 529 ? 503 : $res->{status};
        return { %{ google_error($status, $res->{status} == 429
                        ? 'Quota exceeded for aiplatform.googleapis.com/'
                          . 'online_prediction_requests_per_base_model'
                        : $error->{error}{message} // 'error') },
                 delay_ms => $res->{delay_ms} };
    }

    $res->{headers} = \@headers;
    return $res;
}

# one frame of Amazon's event stream, its headers strings (x-mock-es-
# metadata asks for a "metadata" event after the first, which a gateway
# must leave out)
sub es_frame {
    my ($headers, $payload) = @_;

    my $h = join '', map { pack('C', length $_->[0]) . $_->[0]
                           . pack('Cn', 7, length $_->[1]) . $_->[1] }
                     @$headers;
    my $prelude = pack('NN', 12 + length($h) + length($payload) + 4,
                       length $h);
    $prelude .= pack('N', Compress::Raw::Zlib::crc32($prelude));
    my $message = $prelude . $h . $payload;

    return $message . pack('N', Compress::Raw::Zlib::crc32($message));
}

# AWS's SigV4, computed again from the request as it came; undef if the
# signature is right, else [Bedrock's error type, its message]
sub sigv4_error {
    my ($req) = @_;
    my $h = $req->{headers};

    my ($akid, $day, $region, $service, $names, $sig) =
        ($h->{authorization} =~ m{^AWS4-HMAC-SHA256\s+Credential=([^/]+)/
                                  (\d{8})/([^/]+)/([^/]+)/aws4_request,\s*
                                  SignedHeaders=([^,]+),\s*
                                  Signature=([0-9a-f]{64})$}x)
        or return ['IncompleteSignatureException',
                   'Authorization header requires Credential, '
                   . 'SignedHeaders and Signature.'];

    my $aws = $config->{aws}{$akid}
        or return ['UnrecognizedClientException',
                   'The security token included in the request is invalid.'];

    return ['InvalidSignatureException', "Credential should be scoped to "
            . "correct service: 'bedrock'."]
        unless $service eq 'bedrock';

    my $amz = $h->{'x-amz-date'} // '';
    my ($y, $mo, $d, $hh, $mi, $ss) =
        $amz =~ /^(\d{4})(\d\d)(\d\d)T(\d\d)(\d\d)(\d\d)Z$/
        or return ['IncompleteSignatureException',
                   'X-Amz-Date is missing or malformed.'];
    my $t = Time::Local::timegm($ss, $mi, $hh, $d, $mo - 1, $y);
    return ['InvalidSignatureException', 'Signature expired.']
        if abs($t - time) > 300 || substr($amz, 0, 8) ne $day;

    my @signed = split /;/, $names;
    return ['InvalidSignatureException',
            'host and x-amz-date must be signed.']
        unless grep({ $_ eq 'host' } @signed)
               && grep({ $_ eq 'x-amz-date' } @signed);

    if (defined $aws->{token}) {
        return ['UnrecognizedClientException',
                'The security token included in the request is invalid.']
            unless ($h->{'x-amz-security-token'} // '') eq $aws->{token}
                   && grep { $_ eq 'x-amz-security-token' } @signed;
    }

    my ($path, $query) = split /\?/, $req->{target}, 2;
    my $uri = join '/', map {
        (my $e = $_) =~ s/([^A-Za-z0-9\-._~])/sprintf('%%%02X', ord $1)/ge;
        $e } split m{/}, $path, -1;
    my $canonical_query = join '&', sort split /&/, $query // '';

    my $canonical = join "\n", $req->{method}, $uri, $canonical_query,
        (map { "$_:" . ($h->{$_} // '') } @signed), '', $names,
        sha256_hex($req->{body});
    my $to_sign = join "\n", 'AWS4-HMAC-SHA256', $amz,
        "$day/$region/$service/aws4_request", sha256_hex($canonical);

    my $key = hmac_sha256($day, "AWS4$aws->{secret}");
    $key = hmac_sha256($_, $key) for $region, $service, 'aws4_request';

    return undef if hmac_sha256_hex($to_sign, $key) eq $sig;

    return ['InvalidSignatureException',
            'The request signature we calculated does not match the '
            . 'signature you provided. Check your AWS Secret Access Key and '
            . 'signing method. Consult the service documentation for '
            . 'details.'];
}

# --- routing -------------------------------------------------------------

sub dispatch {
    my ($c, $req) = @_;
    my $path = $req->{path};

    if ($path =~ m{^/_mock/}) {
        return reply($c, $req, control($req));
    }

    if ($path eq '/token') {
        return reply($c, $req, google_token($req));
    }

    if ($path =~ m{^/v1/projects/([^/]+)/locations/([^/]+)/publishers/
                   anthropic/models/([^/:]+):(rawPredict|streamRawPredict)$}x)
    {
        my $res = vertex($req, $3, $4 eq 'streamRawPredict');
        $res->{delay_ms} //= $config->{latency_ms};
        return reply($c, $req, $res);
    }

    if ($path =~ m{^/model/([^/]+)/(invoke|invoke-with-response-stream)$}) {
        my $res = bedrock_invoke($req, $1, $2 ne 'invoke');
        $res->{delay_ms} //= $config->{latency_ms};
        return reply($c, $req, $res);
    }

    if ($path eq '/anthropic/v1/messages') {
        my $res = bedrock($req);
        $res->{delay_ms} //= $config->{latency_ms};
        return reply($c, $req, $res);
    }

    if ($path =~ m{^/v1/}) {
        my $res = provider($req);
        $res->{delay_ms} //= $config->{latency_ms};
        return reply($c, $req, $res);
    }

    reply($c, $req, error_res($req, 404, 'not_found_error', 'Not found'));
}

sub control {
    my ($req) = @_;
    my ($method, $path) = @$req{qw(method path)};

    if ($path eq '/_mock/health' && $method =~ /^(?:GET|HEAD)$/) {
        return { status => 200, body => 'ok',
                 headers => [['content-type', 'text/plain']] };
    }

    if ($path eq '/_mock/log' && $method eq 'GET') {
        return json_res(200, \@log);
    }

    if ($path eq '/_mock/config' && $method eq 'GET') {
        return json_res(200, $config);
    }

    if ($method ne 'POST') {
        return error_res($req, 404, 'not_found_error', 'Not found');
    }

    my $data = length $req->{body}
             ? eval { $JSON->decode($req->{body}) } : {};
    if (ref $data ne 'HASH') {
        return error_res($req, 400, 'invalid_request_error',
                         'control body must be a JSON object');
    }

    if ($path eq '/_mock/reset') {
        %script = ();
        %bucket = ();
        %cache = ();
        @log = ();
        return json_res(200, { ok => JSON::PP::true });
    }

    if ($path eq '/_mock/config') {
        my $new = eval { normalize_config($data) }
            or return error_res($req, 400, 'invalid_request_error', "$@");
        $config = $new;
        %bucket = ();
        %cache = ();
        return json_res(200, { ok => JSON::PP::true });
    }

    if ($path eq '/_mock/script') {
        my ($key, $actions) = @$data{qw(key actions)};
        if (!defined $key || ref $actions ne 'ARRAY'
            || grep { ref $_ ne 'HASH' } @$actions)
        {
            return error_res($req, 400, 'invalid_request_error',
                             'expected {"key": ..., "actions": [{...}]}');
        }
        $script{$key} = { actions => [@$actions], sticky => $data->{sticky} };
        return json_res(200, { ok => JSON::PP::true,
                               queued => scalar @$actions });
    }

    return error_res($req, 404, 'not_found_error', 'Not found');
}

sub normalize_config {
    my ($cfg) = @_;

    die "config must be a JSON object\n" unless ref $cfg eq 'HASH';
    for my $field (qw(keys orgs)) {
        $cfg->{$field} //= {};
        die "config: \"$field\" must be an object\n"
            unless ref $cfg->{$field} eq 'HASH';
    }
    $cfg->{latency_ms} //= 0;
    $cfg->{cache_ttl_s} //= 300;
    $cfg->{cache_ttl_1h_s} //= 3600;

    return $cfg;
}

# Everything under /v1/: authenticate, log, then answer from the key's
# script, a forced status, the org's buckets for the model's class, or
# normally, in that order.
sub provider {
    my ($req, $signed) = @_;
    my $h = $req->{headers};

    # Bedrock's SigV4: the access key id the signature was checked for
    my $credential = $signed // $h->{'x-api-key'} // $h->{'api-key'};
    if (!defined $credential
        && ($h->{authorization} // '') =~ /^Bearer\s+(\S+)/i)
    {
        $credential = $1;
    }
    undef $credential if defined $credential && $credential eq '';

    my ($key_name, $org);
    my $keys = $config->{keys};
    if (%$keys) {
        if (defined $credential && ref $keys->{$credential} eq 'HASH') {
            $key_name = $keys->{$credential}{name};
            $org = $keys->{$credential}{org} // fingerprint($credential);
        }
    } elsif (defined $credential) {
        $org = fingerprint($credential);
    }

    my $ctx = { req => $req, credential => $credential,
                key_name => $key_name, org => $org, now => time,
                class => model_class(undef) };

    my $res = answer($ctx);
    $res->{delay_ms} //= $h->{'x-mock-delay-ms'};

    if (defined $org && openai_path($req->{path})) {
        unshift @{ $res->{headers} }, openai_limit_headers($org,
                                          $ctx->{class}, $ctx->{now});

    } elsif (defined $org) {
        unshift @{ $res->{headers} }, ['anthropic-organization-id', $org],
                                      limit_headers($org, $ctx->{class},
                                                    $ctx->{now});
    }

    # output is counted as it is produced: after the headers went out
    take($org, $ctx->{class}, 'otpm', $res->{output_tokens}, $ctx->{now})
        if $res->{output_tokens};

    log_request($ctx, $res->{status});

    return $res;
}

sub answer {
    my ($ctx) = @_;
    my $req = $ctx->{req};
    my $h = $req->{headers};

    if (!defined $ctx->{org}) {
        return error_res($req, 401, 'authentication_error',
                         $ERROR_MESSAGE{401});
    }

    my $action = next_action($ctx->{credential});

    if ($action && ($action->{status} // 200) != 200) {
        return scripted_error($ctx, $action);
    }

    if (!$action && defined $h->{'x-mock-status'}
        && $h->{'x-mock-status'} =~ /^\d{3}$/ && $h->{'x-mock-status'} != 200)
    {
        return scripted_error($ctx, {
            status      => $h->{'x-mock-status'},
            retry_after => $h->{'x-mock-retry-after'},
        });
    }

    my ($method, $path) = @$req{qw(method path)};

    if ($path eq '/v1/models') {
        return error_res($req, 405, 'invalid_request_error',
                         'Method not allowed') unless $method eq 'GET';
        return with_action(json_res(200, models()), $action);
    }

    if ($path eq '/v1/messages/count_tokens') {
        return error_res($req, 405, 'invalid_request_error',
                         'Method not allowed') unless $method eq 'POST';
        return with_action(json_res(200,
            { input_tokens => estimate_input_tokens($req->{body}) }),
            $action);
    }

    if ($path ne '/v1/messages' && !openai_path($path)) {
        return error_res($req, 404, 'not_found_error', 'Not found');
    }

    return error_res($req, 405, 'invalid_request_error', 'Method not allowed')
        unless $method eq 'POST';

    my $payload = eval { $JSON->decode($req->{body}) };
    if (ref $payload ne 'HASH') {
        return error_res($req, 400, 'invalid_request_error',
                         'request body must be a JSON object');
    }

    $ctx->{class} = model_class($payload->{model});

    my $plan = cache_plan($ctx, $payload);
    return error_res($req, 400, 'invalid_request_error', $plan->{error})
        if $plan && $plan->{error};

    my $usage = usage_of($ctx, $payload, $action || {}, $plan);

    # scripted answers bypass the buckets; everything else draws from them
    if (!$action) {
        my $refused = admit($ctx->{org}, $ctx->{class}, $usage,
                            $payload->{max_completion_tokens}
                            // $payload->{max_tokens}, $ctx->{now});
        $ctx->{refused} = $refused->[0] if $refused;
        # refused before it starts: at once, whatever its latency
        return { %{ error_res($req, 429, 'rate_limit_error',
                              rate_limit_message($ctx->{org}, @$refused[0, 1]),
                              ['retry-after', $refused->[2]]) },
                 delay_ms => 0 }
            if $refused;
    }

    # the answer starts: what it wrote can be read from now on
    cache_commit($ctx, $plan) if $plan;
    $ctx->{usage} = $usage;

    my $res = openai_path($path)
            ? chat_res($ctx, $payload, $action || {}, $usage)
            : message_res($ctx, $payload, $action || {}, $usage);
    $res->{output_tokens} = $usage->{output_tokens} unless $action;

    return with_action($res, $action);
}

# Adds a scripted action's delay and extra headers to a normal answer.
sub with_action {
    my ($res, $action) = @_;

    return $res unless $action;
    $res->{delay_ms} = $action->{delay_ms};
    push @{ $res->{headers} }, extra_headers($action);

    return $res;
}

sub extra_headers {
    my ($action) = @_;
    my $extra = $action->{headers};

    return () unless ref $extra eq 'HASH';
    return map { [ $_, $extra->{$_} ] } sort keys %$extra;
}

sub next_action {
    my ($credential) = @_;

    return undef unless defined $credential;
    my $s = $script{$credential} or return undef;
    my $actions = $s->{actions};

    return undef unless @$actions;
    return $actions->[0] if @$actions == 1 && $s->{sticky};
    return shift @$actions;
}

sub scripted_error {
    my ($ctx, $action) = @_;
    my $req = $ctx->{req};
    my $status = $action->{status};
    my @headers;

    if (defined $action->{retry_after} && length $action->{retry_after}) {
        push @headers, ['retry-after', $action->{retry_after}];
    }
    push @headers, extra_headers($action);

    my $res;
    if (defined $action->{body}) {
        my $body = ref $action->{body} ? $JSON->encode($action->{body})
                                       : $action->{body};
        $res = { status => $status, body => $body,
                 headers => [['content-type', 'application/json'], @headers] };
    } else {
        my $type = $ERROR_TYPE{$status}
                // ($status >= 500 ? 'api_error' : 'invalid_request_error');
        my $message = $status == 429
            ? rate_limit_message($ctx->{org}, 'rpm',
                                 $config->{orgs}{ $ctx->{org} }{rpm})
            : $ERROR_MESSAGE{$status} // $type;
        $res = error_res($req, $status, $type, $message, @headers);
    }

    $res->{delay_ms} = $action->{delay_ms};
    return $res;
}

sub rate_limit_message {
    my ($org, $dim, $limit) = @_;

    return "This request would exceed your organization's rate limit. "
        . $RATE_LIMIT_DOCS unless $limit;

    return "This request would exceed the rate limit for your organization"
        . " ($org) of " . commify($limit) . " $LIMIT_NAME{$dim} per minute. "
        . $RATE_LIMIT_DOCS;
}

# --- the Messages API proper ----------------------------------------------

# What a request uses: its body's size in input tokens (split by the
# prompt cache's plan, if any, into read, written and the rest), up to 15
# output tokens, or what x-mock-usage or the script says.
sub usage_of {
    my ($ctx, $payload, $action, $plan) = @_;
    my $req = $ctx->{req};

    my $cap = $payload->{max_tokens} // $payload->{max_completion_tokens};
    my $max_tokens = looks_like_number($cap) ? $cap : 15;
    my $total = estimate_input_tokens($req->{body});
    my ($read, $written) = $plan ? @$plan{qw(read_tokens write_tokens)}
                                 : (0, 0);
    my %usage = (
        # what the blocks' own sizes leave of the whole body's estimate
        input_tokens                => max(0, $total - $read - $written),
        cache_creation_input_tokens => $written,
        cache_read_input_tokens     => $read,
        output_tokens               => min($max_tokens, 15),
    );

    # copied, not aliased: a foreach over hash elements would create them
    my @overrides = ($req->{headers}{'x-mock-usage'}, $action->{usage});
    for my $override (grep { defined } @overrides) {
        my $u = ref $override ? $override : eval { $JSON->decode($override) };
        @usage{ keys %$u } = values %$u if ref $u eq 'HASH';
    }

    return \%usage;
}

# --- prompt caches ---------------------------------------------------------

use constant CACHE_MIN_TOKENS => 1024;      # Sonnet's minimum prefix
use constant CACHE_LOOKBACK   => 20;        # block boundaries per breakpoint
use constant CACHE_BREAKPOINTS => 4;

# What the org's cache makes of a request, before it is admitted: the
# tokens read and to be written, and the entries to refresh and to write
# once it is answered.  Undef when caching is off or nothing is cacheable;
# { error => ... } for a request the API would refuse.
sub cache_plan {
    my ($ctx, $payload) = @_;

    return undef unless $config->{prompt_cache};

    my $openai = openai_path($ctx->{req}{path});
    my ($blocks, $error) = $openai ? chat_blocks($payload)
                                   : message_blocks($payload);
    return { error => $error } if $error;
    return undef unless @$blocks;

    # OpenAI's caching is automatic: the whole prompt is one breakpoint,
    # looked up at every message boundary
    my @points = $openai
        ? ([ $#$blocks, $config->{cache_ttl_s}, scalar @$blocks ])
        : map { [ $_, $blocks->[$_]{ttl_s}, CACHE_LOOKBACK ] }
          grep { defined $blocks->[$_]{ttl_s} } 0 .. $#$blocks;
    return undef unless @points;

    my $org_cache = $cache{ $ctx->{org} } //= {};
    my $now = $ctx->{now};
    my ($hit, @refresh) = (-1);

    for my $point (@points) {
        my ($at, undef, $lookback) = @$point;

        for my $i (reverse max(0, $at - $lookback + 1) .. $at) {
            last if $blocks->[$i]{tokens} < CACHE_MIN_TOKENS;
            my $entry = $org_cache->{ $blocks->[$i]{digest} } or next;
            next if $entry->{expires} <= $now;
            push @refresh, $blocks->[$i]{digest};
            $hit = max($hit, $i);
            last;
        }
    }

    my $last = $blocks->[ $points[-1][0] ]{tokens};
    my $read = $hit >= 0 ? $blocks->[$hit]{tokens} : 0;

    return {
        read_tokens  => $read,
        # OpenAI bills no writes: a miss is ordinary input
        write_tokens => $last >= CACHE_MIN_TOKENS && !$openai
                        ? $last - $read : 0,
        refresh      => \@refresh,
        write        => [ map { [ $blocks->[ $_->[0] ]{digest}, $_->[1] ] }
                          grep { $blocks->[ $_->[0] ]{tokens}
                                 >= CACHE_MIN_TOKENS } @points ],
    };
}

# The answer has started: the prefixes read live on, those written exist.
sub cache_commit {
    my ($ctx, $plan) = @_;

    my $org_cache = $cache{ $ctx->{org} } //= {};
    my $now = $ctx->{now};

    for my $digest (@{ $plan->{refresh} }) {
        my $entry = $org_cache->{$digest} or next;
        $entry->{expires} = $now + $entry->{ttl_s};
    }

    for my $write (@{ $plan->{write} }) {
        my ($digest, $ttl_s) = @$write;
        my $entry = $org_cache->{$digest} //= { ttl_s => $ttl_s };
        $entry->{ttl_s} = max($entry->{ttl_s}, $ttl_s);
        $entry->{expires} = $now + $entry->{ttl_s};
    }

    # bounded: expired entries go, at most once a second per org
    return if ($pruned{ $ctx->{org} } // 0) > $now - 1;
    $pruned{ $ctx->{org} } = $now;
    delete @$org_cache{ grep { $org_cache->{$_}{expires} <= $now }
                        keys %$org_cache };
}

# A Messages request's blocks in prefix order, each with the digest and
# token estimate of the prefix it ends and, if it is a breakpoint, its TTL
# in seconds.  Returns (blocks) or (undef, error message).
sub message_blocks {
    my ($payload) = @_;
    my @items;

    push @items, map { [ 'tool', $_ ] } list_of($payload->{tools});

    my $system = $payload->{system};
    push @items, ref $system eq 'ARRAY' ? map { [ 'system', $_ ] } @$system
               : defined $system        ? [ 'system', $system ] : ();

    my @messages = list_of($payload->{messages});
    for my $n (0 .. $#messages) {
        my $m = $messages[$n];
        next unless ref $m eq 'HASH';
        my $label = "message $n " . ($m->{role} // '');
        push @items, map { [ $label, $_ ] } ref $m->{content} eq 'ARRAY'
                                            ? @{ $m->{content} }
                                            : $m->{content} // '';
    }

    my $blocks = prefix_blocks($payload->{model}, \@items);

    # a top-level cache_control marks the last block
    my $auto = ttl_of($payload->{cache_control});
    $blocks->[-1]{ttl_s} //= $auto if @$blocks && defined $auto;

    my $n = grep { defined $_->{ttl_s} } @$blocks;
    return (undef, 'A maximum of ' . CACHE_BREAKPOINTS . ' blocks with'
                   . " cache_control may be provided. Found $n.")
        if $n > CACHE_BREAKPOINTS;

    return $blocks;
}

# A Chat Completions request's blocks: its tools, then one per message.
sub chat_blocks {
    my ($payload) = @_;

    my @items = ((map { [ 'tool', $_ ] } list_of($payload->{tools})),
                 (map { [ 'message', $_ ] } list_of($payload->{messages})));
    my $blocks = prefix_blocks($payload->{model}, \@items);
    delete $_->{ttl_s} for @$blocks;

    return $blocks;
}

# Chains [label, block] pairs into prefixes: a prefix's digest covers the
# model and every block up to it, each block re-encoded without its
# cache_control; its tokens are its bytes / 4, as for whole bodies.
sub prefix_blocks {
    my ($model, $items) = @_;
    my $digest = sha256_hex('model ' . ($model // ''));
    my ($bytes, @blocks) = (0);

    for my $item (@$items) {
        my ($label, $block) = @$item;
        my $ttl_s;

        if (ref $block eq 'HASH') {
            $ttl_s = ttl_of($block->{cache_control});
            $block = { %$block };
            delete $block->{cache_control};
        }

        my $encoded = $JSON->encode($block);
        $bytes += length $encoded;
        $digest = sha256_hex("$digest\n$label\n$encoded");
        push @blocks, { digest => $digest, tokens => int($bytes / 4),
                        ttl_s => $ttl_s };
    }

    return \@blocks;
}

# A cache_control's lifetime in seconds; undef if it is none.
sub ttl_of {
    my ($cc) = @_;

    return undef unless ref $cc eq 'HASH'
                        && ($cc->{type} // '') eq 'ephemeral';
    return ($cc->{ttl} // '') eq '1h' ? $config->{cache_ttl_1h_s}
                                      : $config->{cache_ttl_s};
}

sub list_of { ref $_[0] eq 'ARRAY' ? @{ $_[0] } : () }

# The answer's text: a greeting naming the key, or x-mock-text-bytes of
# 40-byte words, one a delta when streamed.
sub answer_text {
    my ($ctx) = @_;
    my $bytes = $ctx->{req}{headers}{'x-mock-text-bytes'};

    return 'Hello from ' . ($ctx->{key_name} // $ctx->{org})
        unless defined $bytes && $bytes =~ /^\d+$/ && $bytes > 0;

    my $word = substr('lorem_ipsum_dolor_sit_amet_' x 2, 0, 39) . ' ';
    my $text = $word x int($bytes / 40);
    return $text . substr($word, 0, $bytes % 40);
}

# A JSON answer gzipped when the request said x-mock-gzip.
sub maybe_gzip {
    my ($ctx, $res) = @_;

    return $res unless $ctx->{req}{headers}{'x-mock-gzip'} && !$res->{stream};

    my $packed;
    gzip(\$res->{body} => \$packed) or die "gzip: $GzipError\n";
    $res->{body} = $packed;
    push @{ $res->{headers} }, ['content-encoding', 'gzip'];
    return $res;
}

sub message_res {
    my ($ctx, $payload, $action, $usage) = @_;
    my $req = $ctx->{req};
    my %usage = %$usage;

    my $model = $payload->{model} // 'claude-sonnet-4-6';

    my $text = answer_text($ctx);
    my $id = 'msg_' . random_id(24);

    if (!$payload->{stream}) {
        return maybe_gzip($ctx, json_res(200, {
            id            => $id,
            type          => 'message',
            role          => 'assistant',
            model         => $model,
            content       => [ { type => 'text', text => $text } ],
            stop_reason   => 'end_turn',
            stop_sequence => undef,
            usage         => \%usage,
        }));
    }

    my $sse = sse_body($id, $model, $text, \%usage, $action->{stream_error});
    my $delay = $req->{headers}{'x-mock-stream-delay-ms'}
             // $action->{stream_delay_ms}
             // $config->{stream_delay_ms}
             // $opt{'stream-delay-ms'};

    return {
        status  => 200,
        headers => [ ['content-type', 'text/event-stream'],
                     ['cache-control', 'no-cache'] ],
        stream  => [ awkward_pieces($sse) ],
        piece_delay_ms => $delay,
    };
}

# OpenAI's Chat Completions: a chat.completion, or chunks ending in
# "data: [DONE]", with a usage chunk (choices empty) first when the client
# asked for stream_options.include_usage.  prompt_tokens counts cached
# tokens too, and prompt_tokens_details.cached_tokens says how many.
sub chat_res {
    my ($ctx, $payload, $action, $usage) = @_;
    my $req = $ctx->{req};

    my $model = $payload->{model} // 'gpt-4o-mini';
    my $text = answer_text($ctx);
    my $id = 'chatcmpl-' . random_id(24);
    my $created = int time;
    my $cached = $usage->{cache_read_input_tokens} // 0;
    my $prompt = ($usage->{input_tokens} // 0) + $cached
               + ($usage->{cache_creation_input_tokens} // 0);
    my $openai_usage = {
        prompt_tokens => $prompt,
        completion_tokens => $usage->{output_tokens},
        total_tokens => $prompt + $usage->{output_tokens},
        prompt_tokens_details => { cached_tokens => $cached },
    };

    if (!$payload->{stream}) {
        my $res = json_res(200, {
            id => $id, object => 'chat.completion', created => $created,
            model => $model,
            choices => [ { index => 0, finish_reason => 'stop',
                           message => { role => 'assistant',
                                        content => $text } } ],
            usage => $openai_usage,
        }, ['x-request-id', $req->{rid}]);
        return maybe_gzip($ctx, $res);
    }

    my $include = ref $payload->{stream_options} eq 'HASH'
                  && $payload->{stream_options}{include_usage};
    my @chunks;

    for my $word ($text =~ /(\S+\s*)/g) {
        push @chunks, {
            id => $id, object => 'chat.completion.chunk',
            created => $created, model => $model,
            choices => [ { index => 0, delta => { content => $word },
                           finish_reason => undef } ],
            $include ? (usage => undef) : (),
        };
    }

    $chunks[-1]{choices}[0]{finish_reason} = 'stop';

    push @chunks, { id => $id, object => 'chat.completion.chunk',
                    created => $created, model => $model, choices => [],
                    usage => $openai_usage }
        if $include;

    my $sse = join('', map { 'data: ' . $JSON->encode($_) . "\n\n" } @chunks)
            . "data: [DONE]\n\n";

    return {
        status  => 200,
        headers => [ ['content-type', 'text/event-stream'],
                     ['cache-control', 'no-cache'],
                     ['x-request-id', $req->{rid}] ],
        stream  => [ awkward_pieces($sse) ],
        piece_delay_ms => $req->{headers}{'x-mock-stream-delay-ms'}
                          // $config->{stream_delay_ms}
                          // $opt{'stream-delay-ms'},
    };
}

# The documented event sequence; with $error the stream breaks off after
# the first delta with an "error" event and no message_stop.
sub sse_body {
    my ($id, $model, $text, $usage, $error) = @_;
    my @events;

    push @events, [message_start => {
        type    => 'message_start',
        message => {
            id => $id, type => 'message', role => 'assistant',
            content => [], model => $model,
            stop_reason => undef, stop_sequence => undef,
            usage => { %$usage, output_tokens => 1 },
        },
    }];
    push @events, [content_block_start => {
        type => 'content_block_start', index => 0,
        content_block => { type => 'text', text => '' },
    }];
    push @events, [ping => { type => 'ping' }];

    for my $word ($text =~ /(\S+\s*)/g) {
        push @events, [content_block_delta => {
            type => 'content_block_delta', index => 0,
            delta => { type => 'text_delta', text => $word },
        }];
        last if $error;
    }

    if ($error) {
        push @events, [error => {
            type  => 'error',
            error => { type => $error, message => $error eq 'overloaded_error'
                                                  ? 'Overloaded' : $error },
        }];
    } else {
        push @events,
            [content_block_stop => { type => 'content_block_stop',
                                     index => 0 }],
            [message_delta => {
                type  => 'message_delta',
                delta => { stop_reason => 'end_turn', stop_sequence => undef },
                usage => $usage,
            }],
            [message_stop => { type => 'message_stop' }];
    }

    return join '', map { "event: $_->[0]\ndata: " . $JSON->encode($_->[1])
                          . "\n\n" } @events;
}

# Splits an SSE body where a careless parser would trip: mid-line, inside
# JSON, inside the first and the last token count, and between an event
# line and its data line.
sub awkward_pieces {
    my ($bytes) = @_;
    my %cut;

    my @numbers;
    while ($bytes =~ /"(?:input|output)_tokens":\d(?=\d)/g) {
        push @numbers, pos($bytes);
    }
    $cut{ $numbers[0] } = $cut{ $numbers[-1] } = 1 if @numbers;

    $cut{ $+[0] } = 1 if $bytes =~ /event: message_stop\n/;

    my @strides = (131, 257, 17, 199);
    for (my ($at, $i) = (23, 0); $at < length $bytes; $i++) {
        $cut{$at} = 1;
        $at += $strides[ $i % @strides ];
    }

    my @cuts = grep { $_ > 0 && $_ < length $bytes } sort { $a <=> $b }
               keys %cut;
    my ($from, @pieces) = (0);
    for my $to (@cuts, length $bytes) {
        push @pieces, substr($bytes, $from, $to - $from);
        $from = $to;
    }

    return @pieces;
}

sub models {
    my @ids = qw(claude-opus-4-8 claude-sonnet-4-6 claude-haiku-4-5);

    return {
        data => [ map { { type => 'model', id => $_, display_name => $_,
                          created_at => '2026-01-01T00:00:00Z' } } @ids ],
        first_id => $ids[0], last_id => $ids[-1],
        has_more => JSON::PP::false,
    };
}

sub estimate_input_tokens {
    my ($body) = @_;
    return max(1, int(length($body) / 4));
}

# --- per-org buckets, one set per model class ------------------------------

# "Rate limits are applied separately for each model": the mock's class of
# a model is its name without the version, claude-opus-4-6 -> claude-opus.
sub model_class {
    my ($model) = @_;

    my $class = defined $model && !ref $model ? $model : 'claude-sonnet-4-6';
    $class =~ s/(?:-[\d.]+)+(?:-latest)?$//;

    return $class;
}

sub limits_of {
    my ($org, $class) = @_;

    my $limits = $config->{orgs}{$org} or return {};
    my $models = $limits->{models};

    return ref $models eq 'HASH' && ref $models->{$class} eq 'HASH'
        ? $models->{$class} : $limits;
}

# A continuously refilling bucket: capacity the per-minute limit, refilled
# at limit/60 a second.  Returns undef if the dimension has no limit.
sub refill {
    my ($org, $class, $dim, $now) = @_;

    my $limit = limits_of($org, $class)->{$dim} or return undef;
    my $b = $bucket{"$org|$class|$dim"} //= { tokens => $limit, at => $now };

    $b->{tokens} = min($limit, $b->{tokens} + ($now - $b->{at}) * $limit / 60);
    $b->{at} = $now;

    return $b;
}

sub take {
    my ($org, $class, $dim, $n, $now) = @_;

    my $b = refill($org, $class, $dim, $now) or return;
    $b->{tokens} -= $n;
}

# Like the provider: a request needs one request and its input tokens
# (cache reads free unless the org says otherwise) now, and output tokens
# not in debt, for they are counted as they are produced.  OpenAI's one
# token limit is charged at once "the maximum of max_tokens and the
# estimated number of tokens".  Returns undef once it has taken them, or
# [dimension, limit, retry-after seconds].
sub admit {
    my ($org, $class, $usage, $max_tokens, $now) = @_;

    my $limits = limits_of($org, $class);
    my $input = ($usage->{input_tokens} // 0)
              + ($usage->{cache_creation_input_tokens} // 0)
              + ($limits->{itpm_cache_reads}
                 ? $usage->{cache_read_input_tokens} // 0 : 0);
    my $prompt = ($usage->{input_tokens} // 0)
               + ($usage->{cache_creation_input_tokens} // 0)
               + ($usage->{cache_read_input_tokens} // 0);
    my %need = (rpm => 1, itpm => $input, otpm => 0.001,
                tpm => max($prompt, $max_tokens // 0));
    $need{project_tpm} = $need{tpm};

    for my $dim (qw(rpm itpm otpm tpm project_tpm)) {
        my $b = refill($org, $class, $dim, $now) or next;
        my $need = min($need{$dim}, $limits->{$dim});

        next if $b->{tokens} >= $need;

        return [ $dim, $limits->{$dim},
                 max(1, ceil(($need - $b->{tokens}) * 60 / $limits->{$dim})) ];
    }

    take($org, $class, 'rpm', 1, $now);
    take($org, $class, 'itpm', $input, $now);
    take($org, $class, 'tpm', $need{tpm}, $now);
    take($org, $class, 'project_tpm', $need{tpm}, $now);

    return undef;
}

sub limit_headers {
    my ($org, $class, $now) = @_;
    my $limits = limits_of($org, $class);
    my @headers;

    for (['requests', 'rpm'], ['input-tokens', 'itpm'],
         ['output-tokens', 'otpm'])
    {
        my ($name, $dim) = @$_;
        my $b = refill($org, $class, $dim, $now) or next;
        my $limit = $limits->{$dim};
        my $full_at = $now + ($limit - $b->{tokens}) * 60 / $limit;

        push @headers,
            ["anthropic-ratelimit-$name-limit", $limit],
            ["anthropic-ratelimit-$name-remaining", max(0, floor($b->{tokens}))],
            ["anthropic-ratelimit-$name-reset", rfc3339($full_at)];
    }

    return @headers;
}

# OpenAI's: x-ratelimit-{limit,remaining,reset}-{requests,tokens}, the
# reset as a Go duration ("1s", "6m0s", "2s81ms", "84ms")
sub openai_limit_headers {
    my ($org, $class, $now) = @_;
    my $limits = limits_of($org, $class);
    my @headers;

    # the project's first: a gateway must not take the last it reads
    for (['requests', 'rpm'], ['project-tokens', 'project_tpm'],
         ['tokens', 'tpm'])
    {
        my ($name, $dim) = @$_;
        my $b = refill($org, $class, $dim, $now) or next;
        my $limit = $limits->{$dim};
        my $ms = int(($limit - $b->{tokens}) * 60000 / $limit);

        push @headers,
            ["x-ratelimit-limit-$name", $limit],
            ["x-ratelimit-remaining-$name", max(0, floor($b->{tokens}))],
            ["x-ratelimit-reset-$name", go_duration($ms)];
    }

    return @headers;
}

sub go_duration {
    my ($ms) = @_;

    return "${ms}ms" if $ms < 1000;

    my $s = int($ms / 1000);
    my $frac = $ms % 1000 ? sprintf('.%03d', $ms % 1000) : '';
    $frac =~ s/0+$//;

    return $s >= 60 ? sprintf('%dm%d%ss', $s / 60, $s % 60, $frac)
                    : "$s${frac}s";
}

# --- request log -----------------------------------------------------------

sub log_request {
    my ($ctx, $status) = @_;
    my $req = $ctx->{req};

    my $record = {
        t_ms       => $req->{t_ms},
        method     => $req->{method},
        path       => $req->{target},
        headers    => $req->{headers},
        credential => $ctx->{credential},
        key_name   => $ctx->{key_name},
        org        => $ctx->{org},
        status     => $status + 0,
        request_id => $req->{rid},
        conn       => $req->{conn},
    };

    # a bench's bodies run to megabytes a minute: it may do without them
    $record->{body} = Encode::decode('UTF-8',
                                     $req->{wire_body} // $req->{body})
        if !defined $config->{log_body} || $config->{log_body};
    $record->{usage} = { %{ $ctx->{usage} } }
        if $ctx->{usage} && $status == 200;
    # which of the org's buckets refused it
    $record->{refused} = $ctx->{refused} if $ctx->{refused};

    push @log, $record;
    print {$log_fh} $JSON->encode($record), "\n" if $log_fh;
}

# --- small helpers ---------------------------------------------------------

sub fingerprint {
    my ($credential) = @_;
    return 'org-' . substr(sha256_hex($credential), 0, 12);
}

sub random_id {
    my ($len) = @_;
    my @chars = ('0' .. '9', 'A' .. 'Z', 'a' .. 'z');
    return join '', map { $chars[ rand @chars ] } 1 .. $len;
}

sub rfc3339 {
    my ($t) = @_;
    return strftime('%Y-%m-%dT%H:%M:%SZ', gmtime ceil($t));
}

sub commify {
    my ($n) = @_;
    1 while $n =~ s/^(\d+)(\d{3})/$1,$2/;
    return $n;
}

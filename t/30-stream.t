#!/usr/bin/perl

# Streaming: a "stream": true answer passes through the gateway as the
# provider sends it, unbuffered and byte for byte, including a stream that
# the provider breaks off with an "event: error".

use strict;
use warnings;

use lib 't/lib';

use Digest::SHA qw(sha256_hex);
use JSON::PP;
use Test::More;

use Ratepool::Test;

my $t = Ratepool::Test->new;

*random_hex = \&Ratepool::Test::random_hex;

my $SECRET = 'sk-ant-mock-' . random_hex(16);
my $TOKEN = 'gw-stream-' . random_hex(16);

my $mock = $t->start_mock(port => 1, log => 1, config => {
    keys => { $SECRET => { org => 'org-a', name => 'a1' } },
    orgs => { 'org-a' => { rpm => 1000, itpm => 30000, otpm => 8000 } },
});

$t->write_file('a1.key', "$SECRET\n");

my $token_sha = sha256_hex($TOKEN);

$t->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m;

    upstream claude {
        ratepool zone=llm;
        ratepool_key a1 org=org-a server=127.0.0.1:%%PORT_1%%
                     key_file=%%TESTDIR%%/a1.key;
        keepalive 8;
    }

    ratepool_workspace backend;
    ratepool_client backend sha256:$token_sha;

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass http://claude;
        }

        location = /ratepool/status {
            ratepool_status;
        }
    }
}
EOF

$t->run;

my $BODY = {
    model => 'claude-sonnet-4-6', max_tokens => 100, stream => JSON::PP::true,
    messages => [ { role => 'user', content => 'Stream to me' } ],
};

# the same request, to the gateway with the gateway token, or to the
# mock itself with the upstream key
sub stream {
    my ($port, $credential, @headers) = @_;

    return $t->http_stream(
        port    => $port,
        method  => 'POST',
        path    => '/v1/messages',
        headers => [ 'x-api-key' => $credential,
                     'anthropic-version' => '2023-06-01', @headers ],
        body    => $BODY,
    );
}

# event names and data lines, with the random message id made stable
sub events {
    my ($body) = @_;
    (my $stable = $body) =~ s/"id":"msg_\w+"/"id":"msg_X"/g;
    return [ map { [ /^event: (\S+)\ndata: (.*)$/s ] } split /\n\n/, $stable ];
}

# ms since the request was sent at which $pattern had fully arrived in
# the (dechunked) body
sub arrival_ms {
    my ($r, $pattern) = @_;
    my $raw = '';

    for my $chunk (@{ $r->{chunks} }) {
        $raw .= $chunk->[1];
        my (undef, $body) = split /\r\n\r\n/, $raw, 2;
        next unless defined $body;
        return $chunk->[0]
            if Ratepool::Test::dechunk($body) =~ $pattern;
    }

    return undef;
}

# a whole stream, slowly

my $r = stream($t->port(0), $TOKEN, 'x-mock-stream-delay-ms' => 150);
my $direct = stream($mock->port, $SECRET, 'x-mock-stream-delay-ms' => 150);

is($r->{status}, 200, 'a streamed request through the gateway is answered');
is($r->{headers}{'content-type'}, 'text/event-stream',
    'as an event stream');
ok(!defined $r->{headers}{'content-length'},
    'with no content-length, the end is not known in advance');
cmp_ok(scalar @{ $r->{chunks} }, '>', 3, 'the stream arrives in several reads');

my $start_ms = arrival_ms($r, qr/event: message_start\ndata: [^\n]*\n/);
my $stop_ms = arrival_ms($r, qr/event: message_stop\ndata: [^\n]*\n\n/);
ok(defined $start_ms && defined $stop_ms
   && $start_ms + 300 < $stop_ms,
   'message_start reaches the client well before message_stop')
    or diag "message_start at " . ($start_ms // 'never') . " ms, "
          . "message_stop at " . ($stop_ms // 'never') . ' ms';
cmp_ok($r->{first_byte_ms} + 300, '<', $r->{last_byte_ms},
    'the first bytes arrive well before the last');

my $events = events($r->{body});
is_deeply([ map { $_->[0] } @$events ],
    [ qw(message_start content_block_start ping), ('content_block_delta') x 3,
      qw(content_block_stop message_delta message_stop) ],
    'every event arrives, in order');
is($events->[-1][0], 'message_stop', 'the stream ends with message_stop');
is_deeply($events, events($direct->{body}),
    'every data line is what the provider sends for the same request');

(my $through = $r->{body}) =~ s/"id":"msg_\w+"/"id":"msg_X"/;
(my $expected = $direct->{body}) =~ s/"id":"msg_\w+"/"id":"msg_X"/;
ok($through eq $expected, 'the body is byte for byte the provider\'s')
    or diag "through the gateway:\n$r->{body}\ndirect:\n$direct->{body}";
is(length $r->{body}, length $direct->{body},
    'not a byte is added or lost');

# a stream broken off by the provider

$mock->script($SECRET, [ { stream_error => 'overloaded_error' } ]);

$r = stream($t->port(0), $TOKEN, 'x-mock-stream-delay-ms' => 20);
$events = events($r->{body});

is($r->{status}, 200, 'a stream broken off mid-way keeps its status 200');
is($r->{headers}{'content-type'}, 'text/event-stream',
    'and stays an event stream');
ok(!$r->{error}, 'the gateway ends the response cleanly')
    or diag $r->{error};
is_deeply([ map { $_->[0] } @$events ],
    [ qw(message_start content_block_start ping content_block_delta error) ],
    'the client gets the events up to the break and the error event');

my $error = eval { decode_json($events->[-1][1]) } || {};
is($error->{error}{type}, 'overloaded_error',
    'the error event is the provider\'s, as it was sent');
ok(!grep({ $_->[0] eq 'message_stop' } @$events),
    'no message_stop is made up');

# the gateway is fine afterwards

$r = stream($t->port(0), $TOKEN, 'x-mock-stream-delay-ms' => 0);
is($r->{status}, 200, 'the next stream is answered');
like($r->{body}, qr/event: message_stop\n/, 'and completes');

$r = $t->http(port => $t->port(0), path => '/ratepool/status');
my $status = eval { decode_json($r->{body}) } || {};
my ($key) = @{ $status->{pools}[0]{keys} || [] };

is($status->{totals}{in_flight}, 0, 'no request is left in flight');
is($key->{responses}{'2xx'}, 3, 'every stream counts as a 200 of the key');
is($key->{state}, 'ok', 'a stream error does not cool the key');

is(scalar(grep { $_->{credential} eq $SECRET } @{ $mock->log }), 4,
    'the provider saw every request once, with the upstream key');

$t->stop;
$t->check_log;

done_testing;

#!/usr/bin/perl

# The test harness and the mock provider, checked through a plain nginx
# (no ratepool module) that proxies to the mock.

use strict;
use warnings;

use lib 't/lib';

use JSON::PP;
use Test::More;
use Time::HiRes ();

use Ratepool::Test;

my $t = Ratepool::Test->new(module => 0);

my %KEY = map { $_ => "sk-ant-mock-$_" } qw(a1 b1 c1 d1 e1);

my $mock = $t->start_mock(port => 1, log => 1, config => {
    keys => {
        $KEY{a1} => { org => 'org-a', name => 'a1' },
        $KEY{b1} => { org => 'org-b', name => 'b1' },
        $KEY{c1} => { org => 'org-c', name => 'c1' },
        $KEY{d1} => { org => 'org-d', name => 'd1' },
        $KEY{e1} => { org => 'org-e', name => 'e1' },
    },
    orgs => {
        'org-a' => { rpm => 1000, itpm => 30000, otpm => 8000 },
        'org-c' => { rpm => 3 },
        'org-d' => { rpm => 3 },
        'org-e' => { itpm => 1000, otpm => 100,
                     models => { 'claude-opus' => { itpm => 600 } } },
    },
});

$t->write_config(<<'EOF');
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    upstream mock {
        server 127.0.0.1:%%PORT_1%%;
        keepalive 8;
    }

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location / {
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }
    }
}
EOF

$t->try_run('plain nginx does not start');

my $port = $t->port(0);

sub messages {
    my ($key, %opt) = @_;

    my $auth = delete $opt{bearer} ? [Authorization => "Bearer $key"]
                                   : ['x-api-key' => $key];
    return $t->http(
        port    => $port,
        method  => 'POST',
        path    => '/v1/messages',
        headers => [ @$auth, 'anthropic-version' => '2023-06-01',
                     @{ delete $opt{headers} || [] } ],
        body    => {
            model => 'claude-sonnet-4-6', max_tokens => 100,
            messages => [ { role => 'user', content => 'Hi there' } ],
            %opt,
        },
    );
}

sub error_type {
    my ($r) = @_;
    my $body = eval { decode_json($r->{body}) } or return '';
    return $body->{error}{type} // '';
}

# a plain message

my $r = messages($KEY{a1});
my $msg = eval { decode_json($r->{body}) } || {};

is($r->{status}, 200, 'a message is answered with 200');
like($r->{headers}{'content-type'}, qr{^application/json},
    'the message is JSON');
is($msg->{content}[0]{text}, 'Hello from a1', 'the reply names the key');
is($msg->{model}, 'claude-sonnet-4-6', 'the reply echoes the model');
cmp_ok($msg->{usage}{input_tokens}, '>', 0, 'usage counts input tokens');
is($msg->{usage}{output_tokens}, 15, 'usage counts 15 output tokens');
is($msg->{usage}{cache_read_input_tokens}, 0, 'usage has cache fields');
like($r->{headers}{'request-id'}, qr/^req_\w+$/, 'a request-id is sent');
is($r->{headers}{'anthropic-organization-id'}, 'org-a',
    'the organization is named');
is($r->{headers}{'anthropic-ratelimit-requests-limit'}, 1000,
    'the request limit is reported');
like($r->{headers}{'anthropic-ratelimit-requests-reset'},
    qr/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/, 'the reset time is RFC 3339');
is($r->{headers}{'anthropic-ratelimit-output-tokens-limit'}, 8000,
    'the output token limit is reported');

# a streamed message

$r = $t->http_stream(
    port    => $port,
    method  => 'POST',
    path    => '/v1/messages',
    headers => [ 'x-api-key' => $KEY{b1} ],
    body    => { model => 'claude-sonnet-4-6', max_tokens => 100,
                 stream => JSON::PP::true, messages => [] },
);

is($r->{status}, 200, 'a stream is answered with 200');
is($r->{headers}{'content-type'}, 'text/event-stream',
    'the stream is an event stream');
cmp_ok(scalar @{ $r->{chunks} }, '>', 3, 'the stream arrives in pieces');
cmp_ok($r->{last_byte_ms} - $r->{first_byte_ms}, '>', 200,
    'the first bytes arrive well before the last');

my @events = map { [ /^event: (\S+)\ndata: (.*)$/s ] } split /\n\n/, $r->{body};
is_deeply([ map { $_->[0] } @events ],
    [ qw(message_start content_block_start ping), ('content_block_delta') x 3,
      qw(content_block_stop message_delta message_stop) ],
    'the events come in the documented order');
is(scalar(grep { (eval { decode_json($_->[1])->{type} } // '') eq $_->[0] }
           @events), scalar @events,
    'every data line is JSON naming its event');
is(join('', map { decode_json($_->[1])->{delta}{text} }
            grep { $_->[0] eq 'content_block_delta' } @events),
    'Hello from b1', 'the deltas spell the reply');
is(decode_json($events[-2][1])->{usage}{output_tokens}, 15,
    'message_delta carries the cumulative output tokens');
is(decode_json($events[0][1])->{message}{usage}{cache_creation_input_tokens},
    0, 'message_start carries the cache fields');

# scripted and forced answers

$mock->script($KEY{a1}, [ { status => 429, retry_after => '7' } ]);

$r = messages($KEY{a1});
is($r->{status}, 429, 'a scripted 429 passes through nginx');
is($r->{headers}{'retry-after'}, '7', 'with its retry-after');
is(error_type($r), 'rate_limit_error', 'and a rate_limit_error body');
is(messages($KEY{a1})->{status}, 200, 'the script is used up after one');

$r = messages($KEY{a1}, headers => [ 'x-mock-status' => 529 ]);
is($r->{status}, 529, 'x-mock-status forces a 529');
is(error_type($r), 'overloaded_error', 'the 529 is overloaded_error');

$mock->script($KEY{b1}, [ { status => 401 } ], sticky => 1);
is_deeply([ map { messages($KEY{b1})->{status} } 1 .. 3 ], [ 401, 401, 401 ],
    'a sticky script repeats its last action');
$mock->script($KEY{b1}, []);
is(messages($KEY{b1}, bearer => 1)->{status}, 200,
    'a bearer token is accepted once the script is cleared');

# the per-org request bucket

my @statuses = map { messages($KEY{c1})->{status} } 1 .. 3;
is_deeply(\@statuses, [ 200, 200, 200 ], 'three requests fit in rpm 3');

$r = messages($KEY{c1});
is($r->{status}, 429, 'the fourth immediate request is limited');
cmp_ok($r->{headers}{'retry-after'}, '>=', 1, 'retry-after is at least 1');
is($r->{headers}{'anthropic-ratelimit-requests-remaining'}, 0,
    'no requests remain');
like(decode_json($r->{body})->{error}{message},
    qr/organization \(org-c\) of 3 requests per minute/,
    'the message names the org and the limit');

my $t0 = Time::HiRes::time;
$r = messages($KEY{c1}, headers => [ 'x-mock-delay-ms' => 3000 ]);
is($r->{status}, 429, 'a slow request over the limit is limited too');
cmp_ok(Time::HiRes::time - $t0, '<', 2,
    'at once: the provider refuses before it starts to answer');

my $parallel = $t->parallel(5, sub { messages($KEY{d1})->{status} });
is_deeply([ sort @$parallel ], [ 200, 200, 200, 429, 429 ],
    'five concurrent requests against rpm 3 get three answers');

# input and output tokens per minute, per model class

sub usage {
    my ($u, $model) = @_;
    return messages($KEY{e1}, headers => [ 'x-mock-usage' => encode_json($u) ],
                    $model ? (model => $model) : ());
}

$r = usage({ input_tokens => 700, output_tokens => 10 });
is($r->{status}, 200, '700 input tokens fit in itpm 1000');
is($r->{headers}{'anthropic-ratelimit-input-tokens-remaining'}, 300,
    'and are counted at once');
is($r->{headers}{'anthropic-ratelimit-output-tokens-remaining'}, 100,
    'output is counted after the headers, as it is produced');

$r = usage({ input_tokens => 400, output_tokens => 1 });
is($r->{status}, 429, '400 more do not');
like(decode_json($r->{body})->{error}{message},
    qr/\(org-e\) of 1,000 input tokens per minute/, 'naming input tokens');
ok($r->{headers}{'retry-after'} >= 6 && $r->{headers}{'retry-after'} <= 7,
    'retry-after is when 100 more have refilled');

is(usage({ input_tokens => 100, cache_read_input_tokens => 5000,
           output_tokens => 150 })->{status}, 200,
    'cache reads do not count toward input tokens');
$r = usage({ input_tokens => 1, output_tokens => 1 });
is($r->{status}, 429, 'an org in debt for output tokens is limited');
like(decode_json($r->{body})->{error}{message}, qr/100 output tokens/,
    'naming output tokens');

is(usage({ input_tokens => 500, output_tokens => 1 }, 'claude-opus-4-6')
   ->{status}, 200, 'another model class has buckets of its own');
$r = usage({ input_tokens => 200 }, 'claude-opus-4-5');
is($r->{status}, 429, 'shared by its versions, with limits of its own');
is($r->{headers}{'anthropic-ratelimit-input-tokens-limit'}, 600,
    'and says so in its headers');

# authentication

$r = messages('sk-ant-mock-unknown');
is($r->{status}, 401, 'an unknown key is rejected');
is(error_type($r), 'authentication_error', 'with authentication_error');

# the mock's request log

my $log = $mock->log;
my ($first) = @$log;

is($first->{credential}, $KEY{a1}, 'the log records the credential');
is($first->{key_name}, 'a1', 'the log records the key name');
is($first->{org}, 'org-a', 'the log records the org');
is($first->{status}, 200, 'the log records the status');
is($first->{headers}{'anthropic-version'}, '2023-06-01',
    'the log records forwarded headers');
like($first->{body}, qr/"max_tokens":100/, 'the log records the body');
is((grep { $_->{credential} eq 'sk-ant-mock-unknown' && $_->{status} == 401
         && !defined $_->{key_name} } @$log), 1,
    'the log records the rejected key');

my %conns = map { $_->{conn} => 1 } @$log;
cmp_ok(scalar keys %conns, '<', scalar @$log,
    'nginx reuses keepalive connections to the mock');

open my $fh, '<', $mock->log_file or die $!;
my @lines = <$fh>;
is(scalar @lines, scalar @$log, 'the log file has one line per request');

# the harness itself

ok($t->reload, 'nginx reloads with new workers');
is(messages($KEY{a1})->{status}, 200, 'requests work after the reload');

$mock->reset;
is_deeply($mock->log, [], 'a reset clears the log');

$t->stop;
$t->check_log;

my ($code, $out) = $t->nginx_test_config;
is($code, 0, 'nginx -t accepts the config');

$t->write_config("%%TEST_GLOBALS%%\nevents {}\nhttp { bogus; }\n");
($code, $out) = $t->nginx_test_config;
isnt($code, 0, 'nginx -t rejects a bad config');
like($out, qr/unknown directive "bogus"/, 'and says why');

done_testing;

#!/usr/bin/perl

# Reservations: a request holds its estimated input and its output cap
# on its workspace and on its key's org while it runs, so that parallel
# requests spread over orgs with room for them; what it really used is
# charged when it ends.  A request whose input can never fit its
# workspace is refused at once; the input estimate learns how much of a
# workspace's bodies the provider counts.  Model classes have buckets of
# their own.

use strict;
use warnings;

use lib 't/lib';

use JSON::PP;
use Test::More;

use Ratepool::Test;

my $t = Ratepool::Test->new;

my %KEY = map { $_ => "sk-ant-mock-$_-" . Ratepool::Test::random_hex(8) }
          qw(a1 b1 c1 d1 e1 w1);
my %TOKEN = map { $_ => "gw-$_-" . Ratepool::Test::random_hex(8) }
            qw(route resv big learn);

my $mock = $t->start_mock(port => 1, log => 1, config => {
    keys => {
        $KEY{a1} => { org => 'org-a', name => 'a1' },
        $KEY{b1} => { org => 'org-b', name => 'b1' },
        $KEY{c1} => { org => 'org-c', name => 'c1' },
        $KEY{d1} => { org => 'org-d', name => 'd1' },
        $KEY{e1} => { org => 'org-e', name => 'e1' },
        $KEY{w1} => { org => 'org-w', name => 'w1' },
    },
});

$t->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m;

    upstream claude {
        ratepool zone=llm;
        ratepool_org org-a otpm=1000;
        ratepool_org org-b otpm=1000;
        ratepool_key a1 org=org-a server=127.0.0.1:%%PORT_1%% key=$KEY{a1};
        ratepool_key b1 org=org-b server=127.0.0.1:%%PORT_1%% key=$KEY{b1};
    }

    upstream classes {
        ratepool zone=llm;
        ratepool_org org-c rpm=100;
        ratepool_org org-c model=claude-opus-* rpm=1;
        ratepool_org org-c model=claude-3-5-haiku-* itpm=1000
                     itpm_cache_reads=on;
        ratepool_key c1 org=org-c server=127.0.0.1:%%PORT_1%% key=$KEY{c1};
    }

    upstream input {
        ratepool zone=llm;
        ratepool_org org-d itpm=1000;
        ratepool_org org-e itpm=1000;
        ratepool_key d1 org=org-d server=127.0.0.1:%%PORT_1%% key=$KEY{d1};
        ratepool_key e1 org=org-e server=127.0.0.1:%%PORT_1%% key=$KEY{e1};
    }

    upstream solo {
        ratepool zone=llm;
        ratepool_key w1 org=org-w server=127.0.0.1:%%PORT_1%% key=$KEY{w1};
    }

    ratepool_workspace route;
    ratepool_workspace resv otpm=1000;
    ratepool_workspace big itpm=5000;
    ratepool_workspace learn itpm=5000;
    ratepool_client route ${\ $t->token_hash($TOKEN{route})};
    ratepool_client resv ${\ $t->token_hash($TOKEN{resv})};
    ratepool_client big ${\ $t->token_hash($TOKEN{big})};
    ratepool_client learn ${\ $t->token_hash($TOKEN{learn})};

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass http://claude;
            ratepool_output_reserve 800;
        }

        location /classes/v1/ {
            rewrite ^/classes(/.*)\$ \$1 break;
            ratepool_pass http://classes;
        }

        location /input/v1/ {
            rewrite ^/input(/.*)\$ \$1 break;
            ratepool_pass http://input;
        }

        location /solo/v1/ {
            rewrite ^/solo(/.*)\$ \$1 break;
            ratepool_pass http://solo;
        }

        location = /ratepool/status {
            ratepool_status;
        }
    }
}
EOF

$t->run;

sub ask {
    my ($who, $path, %opt) = @_;
    my $usage = delete $opt{usage} || { output_tokens => 15 };
    my $body = delete $opt{body} || {};
    my @headers = ('x-mock-usage' => encode_json($usage),
                   @{ delete $opt{headers} || [] });

    return $t->messages(token => $TOKEN{$who}, path => $path,
                        body => $body, headers => \@headers, %opt);
}

sub slow {
    my ($who, $path, $max_tokens) = @_;
    return ask($who, $path, stream => 1, body => { max_tokens => $max_tokens,
                                                   stream => JSON::PP::true },
               headers => [ 'x-mock-stream-delay-ms' => 150 ]);
}

sub names { [ map { $_->{key_name} } @{ $mock->log } ] }

sub orgs { Ratepool::Test::by_name($t->status->{pools}[$_[0]]{orgs}) }

sub workspace {
    Ratepool::Test::by_name($t->status->{workspaces})->{$_[0]};
}

sub message { (eval { decode_json($_[0]{body}) } || {})->{error}{message} }

# requests in flight hold their output cap on their key's org

my $got = $t->parallel(3, sub {
    my $r = slow('route', '/v1/messages', 2000);
    return [ $r->{status}, message($r) ];
});

is_deeply([ sort map { $_->[0] } @$got ], [ 200, 200, 429 ],
    'three slow streams reserving 800 output tokens each: two fit 2 x 1000')
    or diag explain $got;
is_deeply([ sort @{ names() } ], [ 'a1', 'b1' ],
    'the two went to different orgs, each with room for one');
my ($refused) = grep { $_->[0] == 429 } @$got;
like($refused->[1] // '', qr/every key of pool "claude" is at its rate limit/,
    'the third was told the pool is at its limit');

my $orgs = orgs(0);
is($orgs->{'org-a'}{reserved_output_tokens}, 0,
    'once they ended, nothing stays reserved');
ok($orgs->{'org-a'}{otpm_available} >= 985,
    'and each org was charged the 15 tokens it really answered')
    or diag "org-a otpm_available: $orgs->{'org-a'}{otpm_available}";

is(ask('route', '/v1/messages', body => { max_tokens => 900 })->{status}, 200,
    'so a request reserving 900 is admitted right away');

# ... and on their workspace

$mock->reset;
$got = $t->parallel(2, sub {
    my $r = slow('resv', '/solo/v1/messages', 600);
    return [ $r->{status}, message($r) ];
});

is_deeply([ sort map { $_->[0] } @$got ], [ 200, 429 ],
    'a workspace of 1000 output tokens a minute runs one request of 600 '
    . 'at a time');
($refused) = grep { $_->[0] == 429 } @$got;
like($refused->[1] // '',
     qr/workspace "resv" is over its budget of 1000 output tokens/,
     'the other is told which budget');
is(scalar @{ $mock->log }, 1, 'and never reached the provider');

my $ws = workspace('resv');
is($ws->{reserved_output_tokens}, 0, 'the reservation ended with it');
# the bucket refills a token every 60 ms: a slow status read sees one more
ok($ws->{otpm_available} >= 985 && $ws->{otpm_available} <= 990,
   'and the 15 tokens used were charged')
    or diag "resv otpm_available: $ws->{otpm_available}";

is(ask('resv', '/solo/v1/messages', body => { max_tokens => 600 },
       headers => [ 'x-mock-status' => 500 ])->{status}, 500,
   'a request that fails upstream');
$ws = workspace('resv');
ok($ws->{reserved_output_tokens} == 0 && $ws->{otpm_available} >= 985,
   'is charged nothing, and gives back its reservation')
    or diag explain $ws;

# a body that can never fit its workspace (40 kB is more than nginx keeps
# in memory: the body is read from its temporary file)

my $long = { messages => [ { role => 'user', content => 'x' x 40000 } ] };

$mock->reset;
my $r = ask('big', '/solo/v1/messages', body => $long);
is($r->{status}, 400, 'a 40 kB request in a workspace of 5000 input tokens '
   . 'a minute is refused');
like(message($r), qr/estimated at 100\d\d input tokens, more than the 5000 per minute that workspace "big" may use/,
     'at once, saying why and what to change');
is($r->{headers}{'retry-after'}, undef, 'with no retry-after');
is($r->{headers}{'x-should-retry'}, 'false', 'and x-should-retry: false');
is(scalar @{ $mock->log }, 0, 'nothing went upstream');
is(workspace('big')->{reserved_input_tokens}, 0, 'nothing stays reserved');

# the estimate learns what the provider counts of a workspace's bodies

my $cached = { messages => [ { role => 'user', content => 'y' x 16000 } ] };

for (1 .. 10) {
    $r = ask('learn', '/solo/v1/messages', body => $cached,
             usage => { input_tokens => 100, cache_read_input_tokens => 3900,
                        output_tokens => 15 });
    last if $r->{status} != 200;
}

is($r->{status}, 200, 'ten 16 kB requests, mostly read from the cache');
ok(workspace('learn')->{input_bytes_per_token} >= 10,
   'teach the estimate that the provider counts few of their bytes')
    or diag explain workspace('learn');
is(ask('learn', '/solo/v1/messages', body => $long)->{status}, 200,
   'so the 40 kB request is admitted in that workspace');

# input tokens bind: each request goes where its input fits

$mock->reset;
my $prompt = { messages => [ { role => 'user', content => 'z' x 2400 } ] };
my @input;

for (1 .. 3) {
    $r = ask('route', '/input/v1/messages', body => $prompt,
             usage => { input_tokens => 700, output_tokens => 1 });
    push @input, $r;
}

is_deeply([ map { $_->{status} } @input[0, 1] ], [ 200, 200 ],
    'two requests of 700 input tokens, one after the other');
is_deeply([ sort @{ names() } ], [ 'd1', 'e1' ],
    'went to two orgs of 1000 input tokens a minute');
is($input[2]{status}, 429, 'a third finds no org with room for it');
ok($input[2]{headers}{'retry-after'} >= 19
   && $input[2]{headers}{'retry-after'} <= 25,
   'and is told to come back when the 300 left have grown to its 625-odd')
    or diag "retry-after: $input[2]{headers}{'retry-after'}";

# model classes: each has buckets of its own in its org

$mock->reset;
my $opus = { model => 'claude-opus-4-6' };

is(ask('route', '/classes/v1/messages', body => $opus)->{status}, 200,
   'an opus request');
$r = ask('route', '/classes/v1/messages', body => $opus);
is($r->{status}, 429, 'uses up the opus class of 1 request a minute');
is(ask('route', '/classes/v1/messages')->{status}, 200,
   'while a sonnet request still goes to the same org');
is(scalar @{ $mock->log }, 2, 'the limited one never reached the provider');

my $haiku = { model => 'claude-3-5-haiku-latest' };

is(ask('route', '/classes/v1/messages', body => $haiku,
       usage => { input_tokens => 10, cache_read_input_tokens => 2000,
                  output_tokens => 1 })->{status}, 200,
   'a haiku request reading 2000 tokens from the cache');
is(ask('route', '/classes/v1/messages', body => $haiku)->{status}, 429,
   'used up a class that counts cache reads as input');
is(ask('route', '/classes/v1/messages',
       usage => { input_tokens => 10, cache_read_input_tokens => 2000,
                  output_tokens => 1 })->{status}, 200,
   'while the org\'s default class counts them not');

my @classes = sort { $a->{model} cmp $b->{model} }
              grep { $_->{name} eq 'org-c' } @{ $t->status->{pools}[1]{orgs} };

is_deeply([ map { $_->{model} } @classes ],
    [ '', 'claude-3-5-haiku-*', 'claude-opus-*' ],
    'the status shows the org once per class');
is($classes[2]{rpm_available}, 0, 'the opus class has no request left');
ok($classes[0]{rpm_available} >= 96, 'the default class has');
ok($classes[1]{itpm_cache_reads} && !$classes[0]{itpm_cache_reads},
   'and which class counts cache reads');
is($classes[0]{tokens}{cache_read}, 2000,
   'tokens are counted per class too');

$t->stop;
$t->check_log;

done_testing;
